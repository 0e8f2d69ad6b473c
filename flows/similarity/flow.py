"""Prefect flow of the ``similarity`` stage."""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import SimilarityParams, load_params  # noqa: E402


@task(cache_policy=NO_CACHE)
def similarity_task(embeddings: Path, out_dir: Path, params: SimilarityParams) -> dict:
    from flows.similarity.stage import compute_similarity

    return compute_similarity(embeddings, out_dir, params)


@flow(name="similarity")
def similarity_flow(params_path: str = "params.yaml") -> dict:
    """Top-k appearance neighbours of frames and subjects, near-duplicates, hard negatives."""
    params = load_params(params_path)
    stats = similarity_task(Path(params.embed.out_dir) / "embeddings.parquet", Path(params.similarity.out_dir),
                            params.similarity)
    logger = get_run_logger()
    logger.info("similarity: %s", stats)
    deep = stats["rows_searched_past_k"]
    if deep["frames"] or deep["subjects"]:
        logger.info("similarity: %d frame and %d subject rows had near-duplicates down to their last listed "
                    "neighbour and were searched by threshold against every row", deep["frames"], deep["subjects"])
    return stats


def main(params_path: str = "params.yaml") -> None:
    similarity_flow(params_path)

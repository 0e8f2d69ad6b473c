"""Prefect flow of the ``pairs`` stage: one streaming task over the joined tables."""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from flows.config.params import PairsParams, Params, load_params  # noqa: E402
from flows.pairs.stage import build_pairs  # noqa: E402
from flows.splits import split_rule  # noqa: E402


@task(cache_policy=NO_CACHE)
def pairs_task(frames: Path, masks: Path, embeddings: Path, out_dir: Path, params: PairsParams,
               split, ingested: Path) -> dict:
    return build_pairs(frames, masks, embeddings, out_dir, params, split, ingested)


def run_pairs(params: Params) -> dict:
    stats = pairs_task(Path(params.filter.out_dir) / "frames.parquet", Path(params.segment.out_dir) / "masks.parquet",
                       Path(params.embed.out_dir) / "embeddings.parquet", Path(params.pairs.out_dir), params.pairs,
                       quote(split_rule(params)),  # backgrounds: the frame's split (quote: its groups are not walked)
                       Path(params.ingest.out_dir) / "frames.parquet")  # each object's whole capture
    logger = get_run_logger()
    logger.info("pairs: %s; angles %s", stats["pairs"], stats["angle_histogram"])
    return stats


@flow(name="pairs")
def pairs_flow(params_path: str = "params.yaml") -> dict:
    """Mine positive pairs; write data/pairs/pairs.parquet and stats.json."""
    return run_pairs(load_params(params_path))


def main(params_path: str = "params.yaml") -> None:
    pairs_flow(params_path)

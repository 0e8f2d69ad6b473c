"""Prefect flow of the ``embed`` stage.

One task: the DataLoader workers already decode in parallel and the model wants one device,
so there is nothing to gain from several tasks. torch and open_clip are imported inside the
task, so importing the flow stays light.
"""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import EmbedParams, Params, SourcesParams, load_params  # noqa: E402


@task(cache_policy=NO_CACHE)
def embed_task(frames: Path, masks: Path, out_dir: Path, params: EmbedParams, sources: SourcesParams,
               segment_rejects: Path) -> dict:
    from flows.embed.stage import embed_frames

    return embed_frames(frames, masks, out_dir, params, sources, segment_rejects=segment_rejects)


def run_embed(params: Params) -> dict:
    """The flow body: usable inside any flow (the stage's, or a test's)."""
    logger = get_run_logger()
    stats = embed_task(Path(params.filter.out_dir) / "frames.parquet",
                       Path(params.segment.out_dir) / "masks.parquet",
                       Path(params.embed.out_dir), params.embed, params.sources,
                       Path(params.segment.out_dir) / "rejects.parquet")
    if stats["random_weights"]:
        logger.warning("embed: %s has RANDOM weights: the embeddings are meaningless (profile tiny)",
                       stats["model_id"])
    logger.info("embed: %d embedded (dim %d, %s), rejected %s, %.1f img/s on %s", stats["count"], stats["dim"],
                stats["model_id"], stats["rejected"] or "none", stats["throughput_img_s"] or 0.0, stats["device"])
    return stats


@flow(name="embed")
def embed_flow(params_path: str = "params.yaml") -> dict:
    """Embed every segmented subject; write data/embed/{embeddings,rejects}.parquet and stats.json."""
    return run_embed(load_params(params_path))


def main(params_path: str = "params.yaml") -> None:
    from flows.embed.clip_model import check_weights, spec_for

    check_weights(spec_for(load_params(params_path).embed))  # missing weights fail before any flow starts
    embed_flow(params_path)

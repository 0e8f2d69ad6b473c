"""Prefect flow of the ``segment`` stage: plan shards, segment them one after another, merge.

Shards run in sequence in one process: they share one SAM model on one device (the GPU when
present), built on the first shard that needs it. Inside a shard, loader threads keep the
device fed (see flows.segment.stage). Tasks pass file paths, never tables or tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import FilterParams, SegmentParams, SourcesParams, load_params  # noqa: E402
from flows.segment import stage  # noqa: E402
from flows.segment.sam_model import RANDOM_WEIGHTS_WARNING, TINY_SEED  # noqa: E402


@task(cache_policy=NO_CACHE)
def plan_shards(frames: Path, work_dir: Path, frames_per_shard: int) -> list[Path]:
    return stage.plan_shards(frames, work_dir, frames_per_shard=frames_per_shard)


@task(cache_policy=NO_CACHE, task_run_name="segment-{shard.name}")
def segment_shard(shard: Path, sources: SourcesParams, params: SegmentParams, filtering: FilterParams,
                  runner: stage.LazyRunner) -> tuple[stage.ShardOutput, dict]:
    out = stage.ShardOutput(shard.with_suffix(".masks.parquet"), shard.with_suffix(".rejects.parquet"))
    return out, stage.segment_shard(shard, out, sources=sources, params=params, filtering=filtering, runner=runner)


@task(cache_policy=NO_CACHE)
def merge_parts(outs: list[stage.ShardOutput], filter_dir: Path, out_dir: Path, counters: dict,
                model: dict | None) -> dict:
    return stage.merge_outputs([o.masks for o in outs], [o.rejects for o in outs], filter_dir=filter_dir,
                               out_dir=out_dir, counters=counters, model=model)


def run_segment(sources: SourcesParams, filtering: FilterParams, params: SegmentParams,
                device: str | None = None) -> dict:
    """The flow body: usable inside any flow (the stage's, or a test's)."""
    logger = get_run_logger()
    filter_dir, out_dir = Path(filtering.out_dir), Path(params.out_dir)
    work_dir = out_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    shards = plan_shards(filter_dir / "frames.parquet", work_dir, params.frames_per_shard)
    device = device or stage.default_device()
    logger.info("segment: %d shard(s), mode %s, SAM profile %s on %s", len(shards), params.mode,
                params.sam_profile, device)
    if params.sam_profile == "tiny":
        logger.warning(RANDOM_WEIGHTS_WARNING.format(seed=TINY_SEED))
    runner = stage.LazyRunner(params, device)
    outs, counters = [], {}
    for done, shard in enumerate(shards, start=1):
        out, shard_counters = segment_shard(shard, sources, params, filtering, runner)
        outs.append(out)
        for key, value in shard_counters.items():
            counters[key] = counters.get(key, 0) + value
        logger.info("segment: shard %d/%d done (%s)", done, len(shards), shard_counters)
    model = stage.model_summary(runner.runner)
    stats = merge_parts(outs, filter_dir, out_dir, counters, model)
    shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("segment: %d frames = %d masks %s + %d rejected %s; mean quality %s", stats["input_frames"],
                stats["masks"], stats["methods"], stats["rejected"], stats["reasons"], stats["mean_quality"])
    if params.mode == "refine":
        logger.info("segment: refine compared %(compared)d, replaced %(replaced)d, kept provided because SAM's "
                    "mask fails the filter's mask rules %(rejected_by_filters)d", stats["refine"])
    if model is not None and model["random_weights"]:
        logger.warning("segment: SAM masks in %s come from RANDOM weights (%s) and are meaningless",
                       out_dir / "masks.parquet", model["model_id"])
    return stats


@flow(name="segment")
def segment_flow(params_path: str = "params.yaml") -> dict:
    """One subject mask per accepted frame: data/segment/{masks,rejects}.parquet and stats.json."""
    params = load_params(params_path)
    return run_segment(params.sources, params.filter, params.segment)


def main(params_path: str = "params.yaml") -> None:
    segment_flow(params_path)

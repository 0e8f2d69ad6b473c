"""Prefect flow of the ``segment`` stage: plan shards, segment them one after another, merge.

Shards run in sequence in one process: they share one SAM model on one device (the GPU when
present), built on the first shard that needs it. Inside a shard, loader threads keep the
device fed (see flows.segment.stage). Tasks pass file paths, never tables or tensors.
A failed run keeps its finished shards in data/segment/.work; rerunning with the same
inputs, params and code segments only the others (flows.resume).

With ``cluster.address`` the shards go to the Dask cluster's workers instead, each worker with
its own SAM on its own device (flows.cluster); this process plans, records and merges them.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.cluster import Pool, absolute_sources, same_everywhere, work_pool  # noqa: E402
from flows.config.params import ClusterParams, FilterParams, SegmentParams, SourcesParams, load_params  # noqa: E402
from flows.progress import Progress  # noqa: E402
from flows.resume import ResumableWork  # noqa: E402
from flows.segment import stage  # noqa: E402
from flows.tables import count_rows  # noqa: E402
from flows.segment.sam_model import RANDOM_WEIGHTS_WARNING, TINY_SEED  # noqa: E402


@task(cache_policy=NO_CACHE)
def open_shards(filter_dir: Path, out_dir: Path, sources: SourcesParams, filtering: FilterParams,
                params: SegmentParams, device: str, device_id: str | None = None) -> tuple[ResumableWork, list[Path]]:
    return stage.open_shards(filter_dir, out_dir, sources=sources, filtering=filtering, params=params, device=device,
                             device_id=device_id)


@task(cache_policy=NO_CACHE, task_run_name="segment-{shard.name}")
def segment_shard(shard: Path, work: ResumableWork, sources: SourcesParams, params: SegmentParams,
                  filtering: FilterParams, runner: stage.LazyRunner) -> dict:
    """Segment one shard and mark it done; returns its record (counters, model)."""
    counters = stage.segment_shard(shard, stage.shard_output(shard), sources=sources, params=params,
                                   filtering=filtering, runner=runner)
    return stage.mark_shard_done(work, shard, counters, stage.model_summary(runner.runner))


@task(cache_policy=NO_CACHE)
def merge_parts(outs: list[stage.ShardOutput], filter_dir: Path, out_dir: Path, counters: dict,
                model: dict | None) -> dict:
    return stage.merge_outputs([o.masks for o in outs], [o.rejects for o in outs], filter_dir=filter_dir,
                               out_dir=out_dir, counters=counters, model=model)


def run_segment(sources: SourcesParams, filtering: FilterParams, params: SegmentParams,
                device: str | None = None, cluster: ClusterParams | None = None) -> dict:
    """The flow body: usable inside any flow (the stage's, or a test's).

    ``device``: where SAM runs here (default: the GPU when present); on a cluster each worker uses
    its own, which must be the same kind on all of them.
    """
    with work_pool(cluster, local_workers=1) as pool:
        return _segment_on(pool, sources, filtering, params, device)


def _segment_on(pool: Pool, sources: SourcesParams, filtering: FilterParams, params: SegmentParams,
                device: str | None) -> dict:
    logger = get_run_logger()
    filter_dir, out_dir = Path(filtering.out_dir), Path(params.out_dir)
    device_id = None
    if pool.executor is not None:  # the workers' device is the one that decides the masks' bytes
        device_id, out_dir = same_everywhere(pool, stage.worker_device_id, "device"), out_dir.resolve()
        device = device_id.split()[0]
        logger.info("segment: shards go to the Dask cluster at %s (%d worker threads, on %s)", pool.where,
                    pool.workers, device_id)
    device = device or stage.default_device()
    work, shards = open_shards(filter_dir, out_dir, sources, filtering, params, device, device_id)
    finished = {shard.name: work.done(shard.name) for shard in shards}
    logger.info("segment: %d shard(s), mode %s, SAM profile %s on %s", len(shards), params.mode,
                params.sam_profile, device)
    if any(finished.values()):
        logger.info("segment: resuming in %s: %d of %d shard(s) were finished by an earlier run of the same "
                    "inputs, params, device and code", work.folder, sum(map(bool, finished.values())), len(shards))
    if params.sam_profile == "tiny":
        logger.warning(RANDOM_WEIGHTS_WARNING.format(seed=TINY_SEED))
    runner = stage.LazyRunner(params, device)
    counters, models = {}, []
    todo = {shard.name: count_rows(shard) for shard in shards if not finished[shard.name]}
    progress = Progress("segment", sum(todo.values()))  # every 15 s: a line per shard was ~25k lines at MVImgNet scale
    if pool.executor is not None:
        finished |= _segment_on_cluster(pool, work, [s for s in shards if not finished[s.name]], sources, filtering,
                                        params, progress, todo)
    for shard in shards:
        record = finished[shard.name] or segment_shard(shard, work, sources, params, filtering, runner)
        models.append(record["model"])
        for key, value in record["counters"].items():
            counters[key] = counters.get(key, 0) + value
        if shard.name in todo and pool.executor is None:
            progress.update(todo[shard.name])
    progress.close()
    model = stage.first_model(models)
    stats = merge_parts([stage.shard_output(shard) for shard in shards], filter_dir, out_dir, counters, model)
    work.finish()
    logger.info("segment: %d frames = %d masks %s + %d rejected %s; mean quality %s", stats["input_frames"],
                stats["masks"], stats["methods"], stats["rejected"], stats["reasons"], stats["mean_quality"])
    if params.mode == "refine":
        logger.info("segment: refine compared %(compared)d, replaced %(replaced)d, kept provided because SAM's "
                    "mask fails the filter's mask rules %(rejected_by_filters)d", stats["refine"])
    if model is not None and model["random_weights"]:
        logger.warning("segment: SAM masks in %s come from RANDOM weights (%s) and are meaningless",
                       out_dir / "masks.parquet", model["model_id"])
    return stats


def _segment_on_cluster(pool: Pool, work: ResumableWork, shards: list[Path], sources: SourcesParams,
                        filtering: FilterParams, params: SegmentParams, progress: Progress,
                        rows: dict[str, int]) -> dict[str, dict]:
    """Segment ``shards`` on the cluster; each is recorded done here as soon as it comes back, in any
    order (a shard is minutes of SAM: a slow one must not hold the others' records back). Returns the records.
    """
    sources = absolute_sources(sources)
    params = dataclasses.replace(params, sam_checkpoint=os.path.abspath(params.sam_checkpoint))
    queue = iter(shards)
    running: dict[Future, Path] = {}
    records: dict[str, dict] = {}
    try:
        while True:
            while len(running) <= pool.workers and (shard := next(queue, None)) is not None:  # one queued per worker
                job = stage.ShardJob(shard, sources, params, filtering)
                running[pool.executor.submit(stage.segment_shard_job, job)] = shard
            if not running:
                return records
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            failed = None
            for future in done:  # record every shard that finished before raising a failed one's error
                shard = running.pop(future)
                if future.exception() is not None:
                    failed = failed or future
                    continue
                counters, model = future.result()
                records[shard.name] = stage.mark_shard_done(work, shard, counters, model)
                progress.update(rows[shard.name])
            if failed is not None:
                failed.result()
    finally:
        for future in running:  # a failed shard: the others stop (their finished records are kept)
            future.cancel()


@flow(name="segment")
def segment_flow(params_path: str = "params.yaml") -> dict:
    """One subject mask per accepted frame: data/segment/{masks,rejects}.parquet and stats.json."""
    params = load_params(params_path)
    return run_segment(params.sources, params.filter, params.segment, cluster=params.cluster)


def main(params_path: str = "params.yaml") -> None:
    from flows.segment.sam_model import SPECS, check_checkpoint

    loaded = load_params(params_path)
    params = loaded.segment
    frames = Path(loaded.filter.out_dir) / "frames.parquet"
    if params.sam_profile == "sam" and stage.needs_sam(frames, params):  # fail before any flow starts
        check_checkpoint(SPECS[params.sam_model_type], params.sam_checkpoint)
    segment_flow(params_path)

"""Prefect flow of the ``ingest`` stage: plan shards, probe them in parallel tasks, merge.

Tasks are thin wrappers around the plain functions in flows.ingest.*; they pass file
paths, never tables. With ``cluster.address`` each shard task sends its shard's probing to the
Dask cluster and waits for it (flows.cluster); the task itself stays in this process.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Executor
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.cluster import Pool, absolute_sources, work_pool  # noqa: E402
from flows.config.params import ClusterParams, IngestParams, SourcesParams, load_params  # noqa: E402
from flows.accounting import frame_counts  # noqa: E402
from flows.ingest import mvimgnet, openimages  # noqa: E402
from flows.ingest.check import check_source_files  # noqa: E402
from flows.ingest.records import ShardOutput  # noqa: E402
from flows.schemas import FRAMES, REJECTS  # noqa: E402
from flows.tables import concat_tables, write_json_atomic  # noqa: E402
from flows.errors import UserFacingError  # noqa: E402

SHARD_MODULES = {"mvimgnet": mvimgnet, "openimages": openimages}


@task(cache_policy=NO_CACHE)
def plan_source(source: str, sources: SourcesParams, frames_per_shard: int, work_dir: Path):
    """(shard files, extra rejects parts) for one source."""
    if source == "mvimgnet":
        return mvimgnet.plan_shards(sources, frames_per_shard=frames_per_shard, work_dir=work_dir), []
    shards, csv_rejects = openimages.plan_shards(sources, frames_per_shard=frames_per_shard, work_dir=work_dir)
    return shards, [csv_rejects]


@task(cache_policy=NO_CACHE, task_run_name="ingest-{shard.name}")
def ingest_shard(source: str, shard: Path, sources: SourcesParams, probe_side: int,
                 executor: Executor | None = None) -> ShardOutput:
    """Probe one shard here, or on the cluster behind ``executor``."""
    out = ShardOutput(frames=shard.with_suffix(".frames.parquet"), rejects=shard.with_suffix(".rejects.parquet"))
    if executor is None:
        return probe_shard(source, shard, sources, probe_side, out)
    return executor.submit(probe_shard, source, shard, sources, probe_side, out).result()


def probe_shard(source: str, shard: Path, sources: SourcesParams, probe_side: int, out: ShardOutput) -> ShardOutput:
    """The work of one shard (module level: it travels to Dask workers by name)."""
    return SHARD_MODULES[source].ingest_shard(shard, sources, probe_side=probe_side, out=out)


@task(cache_policy=NO_CACHE)
def merge_parts(frame_parts: list[Path], reject_parts: list[Path], out_dir: Path) -> dict:
    frames, rejects = out_dir / "frames.parquet", out_dir / "rejects.parquet"
    concat_tables(frame_parts, frames, FRAMES)
    concat_tables(reject_parts, rejects, REJECTS)
    counts = frame_counts(frames, rejects, stage="ingest")
    summary = {source: {"discovered": c["kept"] + c["rejected"], **c} for source, c in counts.items()}
    write_json_atomic(out_dir / "summary.json", summary)
    return summary


LAYOUTS = {
    "mvimgnet": ("sources.mvimgnet_root", "<class_id>/<object_id>/images/<frame>.jpg"),
    "openimages": ("sources.openimages_root", "<split>/<ImageID>.jpg beside the boxes CSV"),
}


class EmptySourceError(UserFacingError, ValueError):
    """An enabled source in which ingest found nothing: almost always a wrong root."""


def check_sources(summary: dict, sources: SourcesParams) -> list[str]:
    """Raise if an enabled source yielded no frame at all; return warnings for sources whose every frame was rejected."""
    warnings = []
    for source in sources.enabled:
        key, layout = LAYOUTS[source]
        root = getattr(sources, key.split(".")[1])
        counts = summary.get(source)
        if counts is None or counts["discovered"] == 0:
            raise EmptySourceError(f"{key}: no {source} frames found under {root!r} (expected {layout}); "
                                   f"check the path, or leave {source} out of sources.enabled")
        if counts["kept"] == 0:
            reason, n = max(counts["reasons"].items(), key=lambda item: item[1])
            warnings.append(f"ingest {source}: all {counts['discovered']} frames were rejected, most as {reason} "
                            f"({n}); check {key} ({root!r}) and the source's other settings")
    return warnings


def run_ingest(sources: SourcesParams, ingest: IngestParams, cluster: ClusterParams | None = None) -> dict:
    """The flow body: usable inside any flow (the stage's, or a test's)."""
    with work_pool(cluster, local_workers=ingest.max_workers) as pool:
        return _ingest_on(pool, sources, ingest)


def _ingest_on(pool: Pool, sources: SourcesParams, ingest: IngestParams) -> dict:
    logger = get_run_logger()
    check_source_files(sources)  # every path first: a wrong one fails in one line, before any spill
    out_dir = Path(ingest.out_dir)
    if pool.executor is not None:  # shard files and data paths must mean the same on every worker
        sources, out_dir = absolute_sources(sources), out_dir.resolve()
        logger.info("ingest: probing on the Dask cluster at %s (%d worker threads), %d shard(s) in flight",
                    pool.where, pool.workers, ingest.max_workers)
        if ingest.max_workers < pool.workers:
            logger.warning("ingest.max_workers (%d) is below the cluster's %d worker threads: raise it to use "
                           "them all", ingest.max_workers, pool.workers)
    work_dir = out_dir / ".work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    frame_parts: list[Path] = []
    reject_parts: list[Path] = []
    for source in sources.enabled:
        shards, extra_rejects = plan_source(source, sources, ingest.frames_per_shard, work_dir)
        reject_parts += extra_rejects
        logger.info("ingest %s: %d shard(s) of about %d frames", source, len(shards), ingest.frames_per_shard)
        futures = [ingest_shard.submit(source, shard, sources, ingest.probe_side, pool.executor) for shard in shards]
        for done, future in enumerate(futures, start=1):
            out = future.result()
            frame_parts.append(out.frames)
            reject_parts.append(out.rejects)
            logger.info("ingest %s: shard %d/%d done", source, done, len(shards))
    summary = merge_parts(frame_parts, reject_parts, out_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    for source, counts in sorted(summary.items()):
        logger.info("ingest %s: %d discovered, %d frames, %d rejected", source,
                    counts["discovered"], counts["kept"], counts["rejected"])
    for warning in check_sources(summary, sources):
        logger.warning(warning)
    return summary


@flow(name="ingest", log_prints=True)
def ingest_flow(params_path: str = "params.yaml") -> dict:
    """Walk the sources and write data/ingest/{frames,rejects}.parquet and summary.json."""
    params = load_params(params_path)
    return run_ingest(params.sources, params.ingest, params.cluster)


def main(params_path: str = "params.yaml") -> None:
    params = load_params(params_path)
    runner = ThreadPoolTaskRunner(max_workers=params.ingest.max_workers)
    ingest_flow.with_options(task_runner=runner)(params_path)

"""Prefect flow of the ``filter`` stage.

Filtering reads only the frames table (every pixel statistic was measured once in
ingest), and duplicate detection is global, so the stage is one streaming task.
"""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import FilterParams, IngestParams, load_params  # noqa: E402
from flows.filtering.stage import filter_frames  # noqa: E402


@task(cache_policy=NO_CACHE)
def filter_task(ingest_dir: Path, out_dir: Path, params: FilterParams) -> dict:
    return filter_frames(ingest_dir, out_dir, params)


def run_filter(ingest: IngestParams, params: FilterParams) -> dict:
    metrics = filter_task(Path(ingest.out_dir), Path(params.out_dir), params)
    logger = get_run_logger()
    for source, m in sorted(metrics.items()):
        logger.info("filter %s: %d discovered = %d accepted + %d rejected in ingest + %d in filter",
                    source, m["discovered"], m["accepted"], m["rejected_ingest"], m["rejected_filter"])
    return metrics


@flow(name="filter")
def filter_flow(params_path: str = "params.yaml") -> dict:
    """Apply the quality filters; write data/filter/{frames,rejects}.parquet and metrics.json."""
    params = load_params(params_path)
    return run_filter(params.ingest, params.filter)


def main(params_path: str = "params.yaml") -> None:
    filter_flow(params_path)

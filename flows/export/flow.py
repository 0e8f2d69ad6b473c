"""Prefect flow of the ``export`` stage: one streaming task writing the training shards."""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import Params, load_params  # noqa: E402
from flows.export.shards import export_shards  # noqa: E402


@task(cache_policy=NO_CACHE)
def export_task(params: Params) -> dict:
    out_dir = Path(params.export.out_dir)  # the stage replaces the earlier run's shards when it ends
    return export_shards(
        frames=Path(params.filter.out_dir) / "frames.parquet", masks=Path(params.segment.out_dir) / "masks.parquet",
        embeddings=Path(params.embed.out_dir) / "embeddings.parquet", pairs=Path(params.pairs.out_dir) / "pairs.parquet",
        pair_rejects=Path(params.pairs.out_dir) / "rejects.parquet", sources=params.sources, out_dir=out_dir, params=params.export,
        cluster=params.cluster, near_duplicates=Path(params.similarity.out_dir) / "near_duplicates.parquet")


@flow(name="export")
def export_flow(params_path: str = "params.yaml") -> dict:
    """Write data/export/{train,heldout}/part-*.parquet, backgrounds.parquet and stats.json."""
    stats = export_task(load_params(params_path))
    get_run_logger().info("export: %s", stats)
    return stats


def main(params_path: str = "params.yaml") -> None:
    export_flow(params_path)

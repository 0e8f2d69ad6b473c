"""The ``train`` stage: ``python -m cc_model.train [params.yaml]`` runs :func:`cc_model.training.train_model`
as a Prefect flow (what it writes, and how a killed run resumes, is documented there)."""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from cc_model.training import train_processes  # noqa: E402
from flows.config.params import Params, load_params  # noqa: E402


@task(cache_policy=NO_CACHE)
def train_task(params: Params) -> dict:
    return train_processes(params, export_dir=Path(params.export.out_dir),
                           embeddings=Path(params.embed.out_dir) / "embeddings.parquet",
                           near_duplicates=Path(params.similarity.out_dir) / "near_duplicates.parquet",
                           hard_negatives=Path(params.similarity.out_dir) / "hard_negatives.parquet")


@flow(name="train")
def train_flow(params_path: str = "params.yaml") -> dict:
    """Train CustomContrast on data/export/train; write data/train/{checkpoint/,stats.json,loss.csv}."""
    stats = train_task(load_params(params_path))
    get_run_logger().info("train: %s", stats)
    return stats


def main(params_path: str = "params.yaml") -> None:
    train_flow(params_path)


if __name__ == "__main__":
    from flows.cli import run_stage

    run_stage(main)


__all__ = ["train_flow", "train_task"]

"""Prefect flow of the data report: files under data/report/ and Prefect artifacts."""

from __future__ import annotations

from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import Params, load_params  # noqa: E402
from flows.report.build import ReportInputs, build_report  # noqa: E402

REPORT_DIR = Path("data/report")


def report_inputs(params: Params) -> ReportInputs:
    return ReportInputs(
        frames=Path(params.filter.out_dir) / "frames.parquet",
        masks=Path(params.segment.out_dir) / "masks.parquet",
        pairs=Path(params.pairs.out_dir) / "pairs.parquet",
        neighbours=Path(params.similarity.out_dir) / "neighbours.parquet",
        stats={"filter": Path(params.filter.out_dir) / "metrics.json",
               "segment": Path(params.segment.out_dir) / "stats.json",
               "embed": Path(params.embed.out_dir) / "stats.json",
               "pairs": Path(params.pairs.out_dir) / "stats.json",
               "similarity": Path(params.similarity.out_dir) / "stats.json",
               "export": Path(params.export.out_dir) / "stats.json"},
    )


@task(cache_policy=NO_CACHE)
def report_task(params: Params, out_dir: Path) -> dict:
    return build_report(report_inputs(params), params.sources, out_dir,
                        fill=tuple(int(v) for v in params.embed.background_rgb))


@flow(name="report")
def report_flow(params_path: str = "params.yaml", out_dir: str = str(REPORT_DIR)) -> None:
    """Write the data report and publish it as Prefect artifacts."""
    summary = report_task(load_params(params_path), Path(out_dir))
    create_markdown_artifact(key="data-report", markdown=summary["markdown"],
                             description=f"CustomContrast data report (figures in {out_dir})")
    table = [{"histogram": name, "counts": " ".join(map(str, counts))}
             for name, counts in summary["histograms"].items()]
    create_table_artifact(key="data-report-histograms", table=table)


def main(params_path: str = "params.yaml") -> None:
    report_flow(params_path)

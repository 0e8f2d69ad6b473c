"""``python -m flows.deploy [params.yaml]``: serve the pipeline as a scheduled Prefect deployment.

Registers the deployment ``pipeline/<schedule.name>`` (flows.pipeline: ``dvc repro`` of this
project) on the Prefect server named by ``PREFECT_API_URL``, with the cron schedule of
params.yaml's ``schedule:`` section, and serves it: this process runs every scheduled (or
hand-started) run in a subprocess until it is stopped; stopping it pauses the schedule. One
run at a time (a deployment concurrency limit of 1), since two ``dvc repro`` in one project
would collide on DVC's lock.

A schedule needs a server that outlives this process (``prefect server start``); the
project's default ephemeral server runs no schedules, so the command refuses to start without
``PREFECT_API_URL``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import serve  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.config.params import ScheduleParams, load_params  # noqa: E402
from flows.config.typed import ParamsError  # noqa: E402
from flows.errors import UserFacingError  # noqa: E402
from flows.pipeline import pipeline_flow  # noqa: E402


class NoServerError(UserFacingError, RuntimeError):
    """No Prefect server to register a schedule with."""


def build_deployment(schedule: ScheduleParams, *, params_path: str = "params.yaml", project: str | Path = "."):
    """The RunnerDeployment of the pipeline flow for ``schedule``."""
    try:
        cron = Cron(schedule.cron, timezone=schedule.timezone)
    except ValueError as exc:
        raise ParamsError(f"schedule.cron: {exc}") from None
    return pipeline_flow.to_deployment(
        name=schedule.name,
        schedules=[cron],
        paused=schedule.paused,
        parameters={"targets": list(schedule.targets), "params_path": params_path,
                    "project": str(Path(project).resolve())},
        concurrency_limit=1,
        description=f"dvc repro {' '.join(schedule.targets) or '(every stage)'} at '{schedule.cron}' "
                    f"({schedule.timezone})",
        tags=["dvc", "pipeline"],
    )


def main(argv: list[str]) -> None:
    params_path = argv[0] if argv else "params.yaml"
    if not os.environ.get("PREFECT_API_URL"):
        raise NoServerError("a schedule needs a Prefect server: run `prefect server start`, then set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api and run this again")
    schedule = load_params(params_path).schedule
    serve(build_deployment(schedule, params_path=params_path, project=Path.cwd()))


if __name__ == "__main__":
    from flows.cli import run_stage

    run_stage(lambda path: main([path]), sys.argv[1:])


__all__ = ["NoServerError", "build_deployment", "main"]

"""``python -m flows.deploy [params.yaml]``: serve the pipeline as a scheduled Prefect deployment.

Registers the deployment ``pipeline/<schedule.name>`` (flows.pipeline: ``dvc repro`` of this
project) on the Prefect server named by ``PREFECT_API_URL``, with the cron schedule of
params.yaml's ``schedule:`` section, and serves it: this process runs every scheduled (or
hand-started) run in a subprocess until it is stopped; stopping it pauses the schedule. One
run at a time (the serving process's limit, RUNS_AT_ONCE), since two ``dvc repro`` in one
project would collide on DVC's lock; a run cancelled or killed stops DVC and its stage with it
(flows.pipeline, flows/supervise.py).

A schedule needs a server that outlives this process (``prefect server start``); the
project's default ephemeral server runs no schedules, so the command refuses to start without
``PREFECT_API_URL``, or with one where no Prefect API answers (:func:`check_server`). If the
server goes away later, Prefect's runner stops after a few failed polls;
this command then serves again every 30 s until the server is back (a run in flight when the
server went down fails: its stages report to the server). The project is the folder of the
params.yaml given, which must hold dvc.yaml.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import serve  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from flows.config.params import ScheduleParams, load_params  # noqa: E402
from flows.config.typed import ParamsError  # noqa: E402
from flows.errors import UserFacingError  # noqa: E402
from flows.pipeline import pipeline_flow  # noqa: E402


log = logging.getLogger("flows.deploy")


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
        description=f"dvc repro {' '.join(schedule.targets) or '(every stage)'} at '{schedule.cron}' "
                    f"({schedule.timezone})",
        tags=["dvc", "pipeline"],
    )


class NotAProjectError(UserFacingError, ValueError):
    """A params file that is not the params.yaml beside a dvc.yaml."""


def project_of(params_path: str | Path) -> Path:
    """The DVC project a params file belongs to: its folder, which must hold dvc.yaml.

    ``dvc repro`` reads ``params.yaml`` beside ``dvc.yaml``, so only that file can drive a run.
    """
    path = Path(params_path).resolve()
    if path.name != "params.yaml":
        raise NotAProjectError(f"{params_path}: dvc repro reads the params.yaml beside dvc.yaml; "
                               f"pass that file (or a path to it)")
    if not (path.parent / "dvc.yaml").is_file():
        raise NotAProjectError(f"{path.parent}: no dvc.yaml; pass the params.yaml of the DVC project to schedule")
    return path.parent


# Runs one at a time, counted by the serving process (serve's limit), not by a server-side
# concurrency limit: the server keeps that limit's slot in memory, so a server restart during a
# run left the slot taken and every later run waiting for it forever.
RUNS_AT_ONCE = 1


def serve_until_stopped(deployment, *, retry_s: float = 30.0, attempts: int | None = None) -> None:
    """``serve`` the deployment, RUNS_AT_ONCE run at a time; when it stops on an error (the server
    went away: Prefect's runner gives up after a few failed polls), log it and serve again after
    ``retry_s``. Ctrl-C stops it."""
    attempt = 0
    while True:
        attempt += 1
        try:
            serve(deployment, limit=RUNS_AT_ONCE)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of the runner: keep the schedule alive
            if attempts is not None and attempt >= attempts:
                raise
            log.warning("deploy: serving stopped (%s: %s; PREFECT_API_URL=%s); serving again in %.0f s",
                        type(exc).__name__, exc, os.environ.get("PREFECT_API_URL"), retry_s)
            time.sleep(retry_s)


def check_server(url: str) -> None:
    """Raise :class:`NoServerError` naming ``url`` unless a Prefect API answers there (``GET url/health``).

    Only at start: a wrong URL (nothing listening, ``/api`` left off, malformed) fails in one
    line, where :func:`serve_until_stopped` would retry it forever like a server that is briefly
    down. The request goes through Prefect's own client, so its TLS, API-key and header settings
    apply as they will when serving.
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    health = url.rstrip("/") + "/health"
    try:
        with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
            response = client.request("GET", "/health")
    except Exception as exc:  # noqa: BLE001 - refused, TLS, an HTTP error, a malformed URL: no API answers
        raise NoServerError(f"PREFECT_API_URL={url}: no Prefect API answers there ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); start one with `prefect server "
                            f"start`, or fix the URL (the server's API, e.g. http://127.0.0.1:4200/api)") from None
    try:
        healthy = response.status_code == 200 and response.json() is True
    except ValueError:  # a page, not the API's JSON
        healthy = False
    if not healthy:
        raise NoServerError(f"PREFECT_API_URL={url}: GET {health} gave HTTP {response.status_code}, not a Prefect "
                            f"API's health answer; the URL is the server's API, e.g. http://127.0.0.1:4200/api")


def main(argv: list[str]) -> None:
    params_path = argv[0] if argv else "params.yaml"
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise NoServerError("a schedule needs a Prefect server: run `prefect server start`, then set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api and run this again")
    check_server(url)
    project = project_of(params_path)
    schedule = load_params(project / "params.yaml").schedule
    serve_until_stopped(build_deployment(schedule, params_path="params.yaml", project=project))


if __name__ == "__main__":
    from flows.cli import run_stage

    run_stage(lambda path: main([path]), sys.argv[1:])


__all__ = ["NoServerError", "NotAProjectError", "build_deployment", "check_server", "main", "project_of",
           "serve_until_stopped"]

"""The scheduled deployment (flows.deploy) and the pipeline flow (flows.pipeline) on a real Prefect server.

The served process registers pipeline/<name> with its cron schedule, and a run of it runs
``dvc repro`` in a small DVC project; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.config.params import ScheduleParams
from test_supervise import alive
from flows.config.typed import ParamsError

ROOT = Path(__file__).resolve().parents[1]
# the stage's `python` must be this interpreter even when PATH does not lead to it (flows.pipeline.stage_env)
STAGE = "python -c \"import pathlib, sys; pathlib.Path('out.txt').write_text(sys.executable)\""


def test_deployment_carries_the_schedule_and_parameters(tmp_path):
    from flows.deploy import build_deployment

    schedule = ScheduleParams(name="hourly", cron="15 * * * *", timezone="Europe/Paris", targets=["filter"])
    deployment = build_deployment(schedule, params_path="p.yaml", project=tmp_path)
    assert deployment.name == "hourly"
    (cron,) = deployment.schedules
    assert cron.schedule.cron == "15 * * * *" and cron.schedule.timezone == "Europe/Paris"
    assert deployment.parameters == {"targets": ["filter"], "params_path": "p.yaml", "project": str(tmp_path)}
    # one run at a time is the serving process's limit (flows.deploy.RUNS_AT_ONCE), not a server-side one
    assert deployment.concurrency_limit is None


def test_bad_schedules_fail_naming_the_key():
    from flows.deploy import build_deployment

    with pytest.raises(ParamsError, match="timezone: unknown time zone 'Mars/Base'"):
        ScheduleParams(timezone="Mars/Base")
    with pytest.raises(ParamsError, match="cron: must have five fields"):
        ScheduleParams(cron="daily")
    with pytest.raises(ParamsError, match="schedule.cron: Invalid cron string"):
        build_deployment(ScheduleParams(cron="61 * * * *"))


def test_serving_needs_a_server(tmp_path):
    (tmp_path / "params.yaml").write_text("schedule:\n  name: nightly\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(env, PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "h")))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a schedule needs a Prefect server")


def test_a_url_where_no_server_answers_fails_naming_it(tmp_path):
    (tmp_path / "params.yaml").write_text("schedule:\n  name: nightly\n")
    url = "http://127.0.0.1:9/api"  # the discard port: nothing listens
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=url,
                                                           PREFECT_HOME=str(tmp_path / "h")))
    assert proc.returncode == 1  # before: a warning every 30 s, for ever
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: PREFECT_API_URL={url}: no Prefect API answers")


def test_a_url_without_api_fails_and_the_right_one_passes(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import NoServerError, check_server

    api = PREFECT_API_URL.value()
    check_server(api)
    with pytest.raises(NoServerError, match=r"PREFECT_API_URL=http://127.0.0.1:\d+: (GET .*/health gave HTTP \d+, "
                                            r"not a Prefect API's health answer|no Prefect API answers there)"):
        check_server(api.removesuffix("/api"))
    with pytest.raises(NoServerError, match=r"PREFECT_API_URL=http://\[::1/api: no Prefect API answers there"):
        check_server("http://[::1/api")  # malformed: one line too, not httpx's traceback


def dvc_project(path: Path, name: str = "test-nightly") -> Path:
    """A git + DVC project with one stage that writes out.txt, and a schedule section (deployment ``name``)."""
    path.mkdir()
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": STAGE, "outs": ["out.txt"]}}}))
    (path / "params.yaml").write_text(yaml.safe_dump({"schedule": {"name": name, "cron": "0 3 * * *"}}))
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=path, check=True, capture_output=True)
    return path


async def wait_for_deployment(name: str, timeout: float):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:  # not registered yet
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)


def test_served_deployment_runs_dvc_repro(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    project = dvc_project(tmp_path / "project")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_HOME=str(tmp_path / "prefect-home"), PATH="/usr/bin:/bin")  # no venv on PATH
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "flows.deploy", "params.yaml"], cwd=project, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deployment = asyncio.run(wait_for_deployment("pipeline/test-nightly", timeout=120))
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
        assert deployment.parameters["project"] == str(project.resolve())

        run = run_deployment("pipeline/test-nightly", timeout=240, poll_interval=1, as_subflow=False)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
        assert (project / "out.txt").read_text() == sys.executable  # dvc ran the stage, with our python
        assert (project / "dvc.lock").is_file()

        async def summary_artifact():
            async with get_client() as client:
                return await client.read_latest_artifacts()

        artifacts = [a for a in asyncio.run(summary_artifact()) if a.key == "pipeline-summary"]
        assert artifacts and "Stages run: make" in artifacts[0].data

        again = run_deployment("pipeline/test-nightly", timeout=240, poll_interval=1, as_subflow=False)
        assert again.state.is_completed()
        artifacts = [a for a in asyncio.run(summary_artifact()) if a.key == "pipeline-summary"]
        assert "Stages run: none (everything was up to date)" in artifacts[0].data  # DVC judged, not the schedule
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def test_a_failing_stage_fails_the_pipeline_run_with_dvcs_last_lines(prefect_harness, tmp_path):
    from flows.pipeline import DvcReproError, pipeline_flow

    project = dvc_project(tmp_path / "project")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "python -c \"import sys; print('stage says no'); sys.exit(3)\"", "outs": ["out.txt"]}}}))
    with pytest.raises(DvcReproError, match="(?s)dvc repro exited with [1-9].*stage says no"):
        pipeline_flow(project=str(project))


def test_a_bad_params_file_fails_the_run_before_dvc_starts(prefect_harness, tmp_path):
    from flows.pipeline import ParamsCheckError, pipeline_flow

    project = dvc_project(tmp_path / "project")
    (project / "params.yaml").write_text("similarity:\n  kk: 3\n")
    with pytest.raises(ParamsCheckError, match="params.yaml: error: similarity.kk: unknown key"):
        pipeline_flow(targets=["make"], project=str(project))
    assert not (project / "out.txt").exists()


def test_the_project_is_the_params_files_dvc_folder(tmp_path):
    from flows.deploy import NotAProjectError, project_of

    project = dvc_project(tmp_path / "project")
    assert project_of(project / "params.yaml") == project.resolve()
    (project / "other.yaml").write_text("{}")
    with pytest.raises(NotAProjectError, match="dvc repro reads the params.yaml beside dvc.yaml"):
        project_of(project / "other.yaml")
    (tmp_path / "params.yaml").write_text("{}")
    with pytest.raises(NotAProjectError, match="no dvc.yaml"):
        project_of(tmp_path / "params.yaml")


def test_serving_resumes_after_the_server_goes_away(monkeypatch):
    import flows.deploy as deploy

    calls = []

    def runner_that_loses_its_server_twice(deployment, *, limit):
        assert limit == 1  # one run at a time, counted by this process
        calls.append(deployment)
        if len(calls) < 3:
            raise RuntimeError("Service exceeded error threshold")

    monkeypatch.setattr(deploy, "serve", runner_that_loses_its_server_twice)
    deploy.serve_until_stopped("d", retry_s=0)
    assert calls == ["d", "d", "d"]
    calls.clear()
    with pytest.raises(RuntimeError, match="threshold"):
        deploy.serve_until_stopped("d", retry_s=0, attempts=2)


@contextlib.contextmanager
def served(project: Path, tmp_path: Path, name: str):
    """``python -m flows.deploy`` serving ``project`` (schedule ``name``, unique per test: the server is
    shared) against the harness's server; yields its deployment."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONPATH=str(ROOT), PREFECT_API_URL=PREFECT_API_URL.value(),
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "flows.deploy", "params.yaml"], cwd=project, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        yield asyncio.run(wait_for_deployment(f"pipeline/{name}", timeout=120))
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


async def final_state(run_id, timeout: float = 240):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run_id)
            if run.state.is_final():
                return run.state
            await asyncio.sleep(1.0)
    raise TimeoutError(f"flow run {run_id} did not finish in {timeout} s")


def test_runs_started_together_take_turns(prefect_harness, tmp_path):
    # no server-side concurrency slot (a server restart would leave it taken): the serving process runs one at a time
    from prefect.deployments import run_deployment

    project = dvc_project(tmp_path / "project", "take-turns")
    slow = ("python -c \"import pathlib, time; log = pathlib.Path('times.txt'); t0 = time.time(); time.sleep(2); "
            "log.write_text(log.read_text() + f'{t0} {time.time()}\\n' if log.exists() else f'{t0} {time.time()}\\n')\"")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": slow, "always_changed": True}}}))
    with served(project, tmp_path, "take-turns"):
        runs = [run_deployment("pipeline/take-turns", timeout=0, as_subflow=False) for _ in range(2)]
        states = [asyncio.run(final_state(run.id)) for run in runs]
    assert all(state.is_completed() for state in states), (states, (tmp_path / "serve.log").read_text()[-3000:])
    (a0, a1), (b0, b1) = sorted(tuple(map(float, line.split())) for line in (project / "times.txt").read_text().splitlines())
    assert a1 <= b0  # the second stage started after the first had ended


def test_a_cancelled_run_stops_dvc_and_its_stage(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    project = dvc_project(tmp_path / "project", "cancelled")
    stuck = "python -c \"import os, pathlib, time; pathlib.Path('stage.pid').write_text(str(os.getpid())); time.sleep(600)\""
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": stuck, "always_changed": True}}}))
    with served(project, tmp_path, "cancelled"):
        run = run_deployment("pipeline/cancelled", timeout=0, as_subflow=False)
        pid_file = project / "stage.pid"
        deadline = time.monotonic() + 180
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert pid_file.is_file(), (tmp_path / "serve.log").read_text()[-3000:]
        stage = int(pid_file.read_text())

        async def cancel():
            async with get_client() as client:
                await client.set_flow_run_state(run.id, Cancelling(), force=True)

        asyncio.run(cancel())
        state = asyncio.run(final_state(run.id, timeout=120))
        deadline = time.monotonic() + 60
        while alive(stage) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert state.is_cancelled(), state
    assert not alive(stage), "the stage outlived its cancelled run"

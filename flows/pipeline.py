"""The ``pipeline`` Prefect flow: ``dvc repro`` of the project, as a scheduled deployment runs it.

DVC stays the judge of what is stale (and records dvc.lock); each stage it runs is its own
Prefect flow run, reported to the same server because the stage processes inherit
``PREFECT_API_URL``. The flow streams DVC's output into its log, lists the stages that ran,
and publishes the pipeline's accounting (flows.summary) as a markdown artifact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

from flows.runtime import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.config.params import load_params  # noqa: E402
from flows.summary import dvc_changed_stages, summary_lines  # noqa: E402

RAN = re.compile(r"^Running stage '([^']+)'")
SUPERVISE = Path(__file__).with_name("supervise.py")  # run as a script: the project may be another folder


class DvcReproError(RuntimeError):
    """``dvc repro`` exited non-zero; the message ends with its last lines."""


def stage_env() -> dict[str, str]:
    """The environment for dvc: this interpreter's bin first, since stage commands call ``python``."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@task(cache_policy=NO_CACHE)
def dvc_repro(targets: list[str], project: str) -> list[str]:
    """Run ``dvc repro [targets]`` in ``project``; the stages it ran, in order."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", *targets]
    logger.info("%s (in %s)", " ".join(command[1:]), project)
    ran, tail = [], deque(maxlen=40)
    # through flows.supervise: DVC and its stages stop with this run (cancelled, or its process killed)
    env = dict(stage_env(), CC_SUPERVISE_PARENT=str(os.getpid()))
    with subprocess.Popen([sys.executable, str(SUPERVISE), *command], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                logger.info("dvc: %s", line)
                if match := RAN.match(line):
                    ran.append(match.group(1))
        except BaseException:  # Prefect's cancellation or termination: stop DVC and the stage it runs
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise DvcReproError(f"dvc repro exited with {proc.returncode}; last lines:\n" + "\n".join(tail))
    return ran


class ParamsCheckError(RuntimeError):
    """The project's params.yaml failed the project's own check (``python -m flows.config``)."""


@task(cache_policy=NO_CACHE)
def check_params(params_path: str, project: str) -> None:
    """Validate params.yaml at every run, before DVC starts (the deployment serves for months): a
    misspelt key fails even when the targets leave out the check_params stage. It runs the
    check_params stage's command in the project, so the project's own code judges its keys."""
    proc = subprocess.run([sys.executable, "-m", "flows.config", params_path], cwd=project, env=stage_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit status {proc.returncode}"]
        raise ParamsCheckError(f"{Path(project) / params_path}: {lines[-1]}")


@task(cache_policy=NO_CACHE)
def publish_summary(params_path: str, project: str, ran: list[str]) -> str:
    """The accounting of flows.summary as a markdown artifact (key ``pipeline-summary``)."""
    params = load_params(Path(project) / params_path)
    cwd = os.getcwd()
    os.chdir(project)  # params hold paths relative to the project
    try:
        lines = summary_lines(params, dvc_changed_stages())
    finally:
        os.chdir(cwd)
    stages = ", ".join(ran) if ran else "none (everything was up to date)"
    markdown = f"# Pipeline run\n\nStages run: {stages}\n\n```\n" + "\n".join(lines) + "\n```\n"
    create_markdown_artifact(markdown=markdown, key="pipeline-summary", description="dvc repro: accounting")
    return markdown


@flow(name="pipeline")
def pipeline_flow(targets: list[str] | None = None, params_path: str = "params.yaml", project: str = ".") -> dict:
    """``dvc repro [targets]`` in ``project``, then the accounting as an artifact."""
    project = str(Path(project).resolve())
    check_params(params_path, project)
    ran = dvc_repro(list(targets or []), project)
    publish_summary(params_path, project, ran)
    get_run_logger().info("pipeline: stages run: %s", ran or "none")
    return {"stages_run": ran}


__all__ = ["DvcReproError", "ParamsCheckError", "pipeline_flow", "stage_env"]

"""Shared fixtures. Prefect runs against one temporary local server for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "tests"))
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # prefect makes only the last level

from flows.runtime import configure  # noqa: E402

configure()

from pipeline_tables import tables  # noqa: E402,F401  (fixture shared by stage tests)


@pytest.fixture(scope="session")
def prefect_harness():
    """A real (temporary, local) Prefect server for tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_cluster():
    """A real Dask cluster on this machine: a scheduler and two worker processes of one thread each."""
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.WARNING) as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _no_error_line_at_exit():
    """flows.cli prints a stage's error line at interpreter exit; a test that calls run_stage in this
    process must not leave one for the end of the test session's output."""
    yield
    from flows import cli

    cli._LAST_WORDS.clear()

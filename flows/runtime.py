"""Process-wide environment for running flows: call :func:`configure` before importing prefect.

Prefect runs in ephemeral mode by default (a temporary local server per process) with a
project-local PREFECT_HOME and analytics off. A user with a real server only sets
PREFECT_API_URL; nothing here overrides a value the user already set.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_DEFAULTS = {
    "PREFECT_HOME": str(PROJECT_ROOT / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "flows",  # the stages' own loggers (progress lines) show beside Prefect's
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # stage functions also run outside flows (tests, benchmarks)
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow",
}


def configure() -> None:
    """Set the defaults above where the environment does not already say otherwise."""
    for key, value in _DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("flows").setLevel(logging.INFO)  # else the root logger's WARNING hides progress

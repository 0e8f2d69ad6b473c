"""Entry point shared by the stages' ``python -m flows.<stage> [params.yaml]``.

Errors the user fixes (flows.errors.UserFacingError: a params key, a missing or damaged
file, a checkpoint to fetch) end the command with one ``error: ...`` line on stderr and exit
status 1, not a traceback; Prefect's own log above it still holds the traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flows.config.params import load_params
from flows.errors import UserFacingError


def run_stage(main: Callable[[str], object], argv: list[str] | None = None) -> None:
    """Validate params first, so a bad key fails in one line before any flow starts."""
    args = sys.argv[1:] if argv is None else argv
    params_path = args[0] if args else "params.yaml"
    try:
        load_params(params_path)
        main(params_path)
    except UserFacingError as exc:  # the message says what to fix; a traceback would bury it
        sys.exit(f"error: {exc}")

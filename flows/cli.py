"""Entry point shared by the stages' ``python -m flows.<stage> [params.yaml]``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from flows.config.params import load_params
from flows.config.typed import ParamsError


def run_stage(main: Callable[[str], object], argv: list[str] | None = None) -> None:
    """Validate params first, so a bad key fails in one line before any flow starts."""
    args = sys.argv[1:] if argv is None else argv
    params_path = args[0] if args else "params.yaml"
    try:
        load_params(params_path)
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    main(params_path)

"""Entry point shared by the stages' ``python -m flows.<stage> [params.yaml]``.

Errors the user fixes (flows.errors.UserFacingError: a params key, a missing or damaged
file, a checkpoint to fetch) end the command with one ``error: ...`` line on stderr and exit
status 1, not a traceback; Prefect's own log above it still holds the traceback.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable

from flows.config.params import load_params
from flows.errors import UserFacingError

_LAST_WORDS: list[str] = []  # the error line to print at exit


def _say_last_words() -> None:
    if _LAST_WORDS:
        print(_LAST_WORDS[-1], file=sys.stderr, flush=True)


def run_stage(main: Callable[[str], object], argv: list[str] | None = None) -> None:
    """Validate params first, so a bad key fails in one line before any flow starts.

    The ``error:`` line is printed at exit, by a handler registered before any flow runs: exit
    handlers run last-registered first, so it comes after Prefect's own (the temporary
    server's "Stopping" line) and stays the command's last line.
    """
    args = sys.argv[1:] if argv is None else argv
    params_path = args[0] if args else "params.yaml"
    atexit.unregister(_say_last_words)
    atexit.register(_say_last_words)
    try:
        load_params(params_path)
        main(params_path)
    except UserFacingError as exc:  # the message says what to fix; a traceback would bury it
        _LAST_WORDS.append(f"error: {exc}")
        stop = SystemExit(_LAST_WORDS[-1])  # str(): the line, for callers in this process
        stop.code = 1  # exit status 1, the line printed by _say_last_words
        raise stop from None

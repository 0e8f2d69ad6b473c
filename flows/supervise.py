"""``python flows/supervise.py COMMAND...``: run a command so that it never outlives its caller.

The scheduled pipeline (flows.pipeline) runs ``dvc repro``, and DVC runs each stage as its own
child. When Prefect cancels the flow run, or its runner stops, the flow's process is killed; a
plain child would live on, still running a stage and holding DVC's lock, and the next run would
fail on that lock. This wrapper is the flow's direct child:

- the command runs in a process group (a new session) of its own, DVC and every stage with it;
- on SIGTERM or SIGINT, the whole group gets SIGTERM, then SIGKILL after ``GRACE_S``;
- on Linux the kernel sends this wrapper SIGTERM when the thread that started it dies
  (``PR_SET_PDEATHSIG``), so even a SIGKILL of the flow's process stops the group.

The exit status is the command's (128 + the signal's number when it was stopped).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

GRACE_S = 20.0  # between SIGTERM and SIGKILL of the group: time for stages to close their files
POLL_S = 0.2  # how often the wait looks for a stop signal
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask for SIGTERM when the parent dies (Linux); if it already has, stop now."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        raise SystemExit(128 + signal.SIGTERM)


def stop_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the command's process group; SIGKILL to whatever of it is left after ``grace_s``."""
    _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _signal_group(proc.pid, 0):
        proc.poll()  # reap the leader: a zombie still counts as a member of its group
        time.sleep(0.1)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group (0: only ask whether it has members); False if it has none."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def main(argv: list[str]) -> int:
    parent = int(os.environ.pop("CC_SUPERVISE_PARENT", os.getppid()))
    die_with_parent(parent)
    stopped: list[int] = []
    # the handler only records: a signal that lands while Popen starts the child (before ``proc``
    # exists) is acted on right after, never lost with the child left running
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    proc = subprocess.Popen(argv, start_new_session=True)
    while not stopped:
        try:
            return exit_status(proc.wait(timeout=POLL_S))
        except subprocess.TimeoutExpired:
            continue
    stop_group(proc)
    return 128 + stopped[0]


def exit_status(returncode: int) -> int:
    """The shell's convention: a command killed by signal s exits with 128 + s (Popen reports -s)."""
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python flows/supervise.py COMMAND [ARG...]")
    sys.exit(main(sys.argv[1:]))

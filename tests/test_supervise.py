"""flows/supervise.py: the command and everything it started stop with the wrapper or its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SUPERVISE = Path(__file__).resolve().parents[1] / "flows" / "supervise.py"
# a command that starts a grandchild and waits: both write their pids
FAMILY = "sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; wait"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its new parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def pids_of(path: Path, count: int = 2) -> list[int]:
    assert wait_for(lambda: path.is_file() and len(path.read_text().split()) >= count), "the command did not start"
    return [int(p) for p in path.read_text().split()]


def test_the_commands_exit_status_passes_through():
    assert subprocess.run([sys.executable, str(SUPERVISE), "sh", "-c", "exit 3"]).returncode == 3
    killed = subprocess.run([sys.executable, str(SUPERVISE), "sh", "-c", "kill -9 $$"])
    assert killed.returncode == 128 + signal.SIGKILL  # the shell's convention, not 256 - 9


def test_sigterm_stops_the_command_and_its_children(tmp_path):
    pids = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, str(SUPERVISE), "sh", "-c", FAMILY.format(pids=pids)])
    family = pids_of(pids)
    assert all(alive(pid) for pid in family)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert wait_for(lambda: not any(alive(pid) for pid in family)), "a child outlived the wrapper"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_parent_takes_the_command_and_its_children_with_it(tmp_path):
    # the parent (a flow run's process) is SIGKILLed: no Python runs there, the kernel tells the wrapper
    pids = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys; "
        f"env = dict(os.environ, CC_SUPERVISE_PARENT=str(os.getpid())); "
        f"subprocess.Popen([sys.executable, {str(SUPERVISE)!r}, 'sh', '-c', {FAMILY.format(pids=pids)!r}], env=env)"
        ".wait()")])
    family = pids_of(pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    assert wait_for(lambda: not any(alive(pid) for pid in family)), "a child outlived its killed parent"

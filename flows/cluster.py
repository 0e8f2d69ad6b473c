"""Where a stage's heavy per-item work runs: this machine, or a Dask cluster.

``cluster.address`` in params.yaml names a running Dask scheduler (``tcp://host:8786``). Ingest's
shard probing, segment's SAM shards and export's image encoding then go to its workers; the
stage's own process keeps the planning, reading, ordering and writing, so the outputs are the same
bytes wherever the work ran. ``null`` keeps everything on this machine.

What a cluster needs, checked when the stage connects (:func:`check_workers`):

- the scheduler and every worker run this project at the same code version (the ``flows``
  sources hash the same) with the same versions of the libraries that decide the bytes
  (:data:`BYTE_LIBRARIES`); the scheduler unpickles every task, so it imports our code too;
- the data at the same absolute paths (a shared file system): work items carry absolute paths
  (:func:`absolute_sources`), never paths relative to the stage's working folder.

Work goes only to the workers checked at connect time. No Prefect server is needed on the
workers: the Prefect tasks stay in the stage's process and only plain functions travel to Dask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.errors import UserFacingError
from flows.resume import library_versions

if TYPE_CHECKING:
    from flows.config.params import ClusterParams, SourcesParams

FLOWS = Path(__file__).resolve().parent
# The libraries whose versions decide the bytes a worker returns (decoding, resizing, RLE, tables, SAM).
BYTE_LIBRARIES = ("pillow", "numpy", "pycocotools", "pyarrow", "open_clip_torch", "torch", "segment-anything",
                  "opencv-python-headless")


class ClusterError(UserFacingError, RuntimeError):
    """The Dask cluster cannot be reached, or its workers could not return the same bytes as here."""


@dataclass(frozen=True)
class Pool:
    """Where to send work: ``executor`` None means this process (or a pool the caller makes)."""

    executor: Executor | None
    workers: int  # how many items can run at once
    where: str  # for log lines: "this machine" or the scheduler's address
    client: Any = None  # the distributed.Client behind ``executor``, if any (to ask every worker something)
    checked: list[str] | None = None  # the workers ``executor`` sends work to


def fingerprint() -> dict[str, object]:
    """This interpreter's code and library versions (run here and, through Dask, on every worker)."""
    digest = hashlib.sha256()
    for source in sorted(FLOWS.rglob("*.py")):
        digest.update(f"{source.relative_to(FLOWS).as_posix()}\n".encode())
        digest.update(source.read_bytes())
    # "where" is only told, never compared: machines keep the project in different folders
    return {"flows": digest.hexdigest(), "libraries": library_versions(*BYTE_LIBRARIES), "where": str(FLOWS)}


def mismatches(local: dict[str, object], workers: dict[str, dict[str, object]]) -> list[str]:
    """One line per worker whose fingerprint differs from ``local``, saying what differs."""
    lines = []
    for worker, theirs in sorted(workers.items()):
        if theirs.get("flows") != local["flows"]:
            lines.append(f"{worker}: its flows/ code ({theirs.get('where', 'a folder it does not name')}) differs "
                         f"from this machine's ({local.get('where')})")
        ours_libs, their_libs = local["libraries"], theirs.get("libraries", {})
        for name in sorted(ours_libs):
            if their_libs.get(name) != ours_libs[name]:
                lines.append(f"{worker}: {name} {their_libs.get(name, 'absent')}, here {ours_libs[name]}")
    return lines


def check_workers(client) -> dict[str, int]:
    """Raise :class:`ClusterError` unless the scheduler and every worker match this machine.

    Returns the checked workers' threads by address: work goes only to them (a worker that joins
    later is not checked, so it gets none). The scheduler is checked too: it unpickles each task,
    whose function it must be able to import.
    """
    threads = client.nthreads()
    if not threads:
        raise ClusterError(f"cluster.address: the Dask scheduler at {client.scheduler.address} has no workers; "
                           f"start some (dask worker {client.scheduler.address})")
    here = fingerprint()
    try:
        on_scheduler = client.run_on_scheduler(fingerprint)
    except Exception as exc:  # distributed re-raises the scheduler's error as a plain Exception
        raise ClusterError(f"cluster.address: the Dask scheduler cannot run this project's code ({exc}); start "
                           f"'dask scheduler' from this project's environment") from None
    try:
        theirs = client.run(fingerprint, workers=list(threads), on_error="return", wait=True)
    except Exception as exc:
        raise ClusterError(f"cluster.address: asking the Dask workers for their versions failed ({exc})") from None
    failed = [f"{worker}: {answer!r}" for worker, answer in sorted(theirs.items()) if isinstance(answer, BaseException)]
    if failed:
        raise ClusterError("cluster.address: these Dask workers cannot run this project's code; install it on "
                           f"every worker (pip install -e .): {'; '.join(failed)}")
    wrong = mismatches(here, {"scheduler": on_scheduler, **theirs})
    if wrong:
        raise ClusterError("cluster.address: these Dask processes would not return the same bytes as this machine "
                           f"(install this project's version on them): {'; '.join(wrong)}")
    return {worker: threads[worker] for worker in theirs}


@contextmanager
def connect(address: str, *, timeout_s: float):
    """A distributed Client of the scheduler at ``address``; :class:`ClusterError` if none answers in time.

    The Client is made in a daemon thread with a hard deadline: a port that accepts the connection
    but never answers (a stopped scheduler, another service) would otherwise block past the timeout.
    """
    from distributed import Client

    made: dict[str, object] = {}
    gave_up = threading.Event()

    def make() -> None:
        try:
            client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            made["error"] = exc
            return
        made["client"] = client
        if gave_up.is_set():  # connected after the deadline: nobody will use it
            client.close()

    maker = threading.Thread(target=make, name="dask-connect", daemon=True)
    maker.start()
    maker.join(timeout_s + 5)
    gave_up.set()
    if "client" not in made:
        error = made.get("error")
        if error is None or isinstance(error, (OSError, TimeoutError)):
            raise ClusterError(f"cluster.address: no Dask scheduler answered at {address} within {timeout_s:g} s "
                               f"({error or f'no answer after {timeout_s + 5:g} s'}); start one (dask scheduler), "
                               f"or set cluster.address: null to work on this machine")
        raise ClusterError(f"cluster.address: cannot connect to the Dask scheduler at {address} "
                           f"({type(error).__name__}: {error})")
    client = made["client"]
    try:
        yield client
    finally:
        client.close()


@contextmanager
def work_pool(cluster: ClusterParams | None, *, local_workers: int) -> Iterator[Pool]:
    """The :class:`Pool` for ``cluster``: a Dask executor over its checked workers, or ``local_workers`` here.

    Here the executor is None: the caller keeps its own local way of running (a process pool made
    by flows.parallel.ordered_map, a thread pool of Prefect tasks).
    """
    if cluster is None or cluster.address is None:
        yield Pool(None, local_workers, "this machine")
        return
    with connect(cluster.address, timeout_s=cluster.connect_timeout_s) as client:
        threads = check_workers(client)
        executor = client.get_executor(pure=False, workers=list(threads), allow_other_workers=False)
        watch = _Watch(client, set(threads))
        try:
            yield Pool(executor, sum(threads.values()), cluster.address, client, list(threads))
        except BaseException:
            if watch.lost.is_set():
                raise ClusterError(f"cluster.address: every Dask worker checked at the start ({', '.join(threads)}) "
                                   f"is gone (a worker restarted by its nanny comes back unchecked); rerun the "
                                   f"stage: finished pieces are kept") from None
            raise
        finally:
            watch.stop()  # first: after it, nothing closes the client behind this thread's back
            if not watch.lost.is_set():  # else the client is closed, its tasks cancelled already
                executor.shutdown(wait=False)


class _Watch:
    """Ends the work if no checked worker is left: their tasks could then only wait forever.

    Work is pinned to the workers checked at connect time; when all of them are gone, the client is
    closed, which cancels every pending task, and :func:`work_pool` turns that into a
    :class:`ClusterError`.
    """

    EVERY_S = 2.0

    def __init__(self, client, checked: set[str]):
        self.client, self.checked = client, checked
        self.lost, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="dask-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY_S):
            try:
                alive = set(self.client.nthreads())
            except Exception:  # noqa: BLE001 - the scheduler itself is gone: the client's own errors say so
                return
            if not alive & self.checked:
                self.lost.set()
                self.client.close()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def same_everywhere(pool: Pool, fn, what: str) -> Any:
    """``fn()``'s answer, which every worker of ``pool`` must give alike (:class:`ClusterError` if not)."""
    answers = pool.client.run(fn, workers=pool.checked)
    if len(set(map(repr, answers.values()))) > 1:
        detail = "; ".join(f"{worker}: {answer}" for worker, answer in sorted(answers.items()))
        raise ClusterError(f"cluster.address: the Dask workers differ in {what} ({detail}); "
                           f"make them alike (one kind of device per cluster)")
    return next(iter(answers.values()))


def absolute_sources(sources: SourcesParams) -> SourcesParams:
    """``sources`` with every root made absolute, for work items that run in another process's folder."""
    return dataclasses.replace(sources, **{
        name: os.path.abspath(getattr(sources, name))
        for name in ("mvimgnet_root", "mvimgnet_mask_root", "mvimgnet_categories", "openimages_root",
                     "dreambench_root")})


__all__ = ["ClusterError", "Pool", "absolute_sources", "check_workers", "connect", "fingerprint", "mismatches",
           "same_everywhere", "work_pool"]

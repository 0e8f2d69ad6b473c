"""Where a stage's CPU-heavy per-item work runs: processes on this machine, or a Dask cluster.

``cluster.address`` in params.yaml names a running Dask scheduler (``tcp://host:8786``). Ingest's
shard probing and export's image encoding then go to its workers; the stage's own process keeps
the reading, ordering and writing, so the outputs are the same bytes wherever the work ran.
``null`` keeps everything on this machine (``ingest.max_workers`` threads, ``export.workers``
processes).

What a cluster's workers need, checked when the stage connects (:func:`check_workers`):

- this project installed at the same code version (the ``flows`` sources hash the same) with the
  same versions of the libraries that decide the bytes (Pillow, NumPy, pycocotools, PyArrow);
- the data at the same absolute paths (a shared file system): work items carry absolute paths
  (:func:`absolute_sources`), never paths relative to the stage's working folder.

No Prefect server is needed on the workers: the Prefect tasks stay in the stage's process and
only plain functions travel to Dask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flows.errors import UserFacingError
from flows.resume import library_versions

if TYPE_CHECKING:
    from flows.config.params import ClusterParams, SourcesParams

FLOWS = Path(__file__).resolve().parent
# The libraries whose versions decide the bytes a worker returns (decoding, resizing, RLE, tables).
BYTE_LIBRARIES = ("pillow", "numpy", "pycocotools", "pyarrow", "open_clip_torch")


class ClusterError(UserFacingError, RuntimeError):
    """The Dask cluster cannot be reached, or its workers could not return the same bytes as here."""


@dataclass(frozen=True)
class Pool:
    """Where to send work: ``executor`` None means this process (or a pool the caller makes)."""

    executor: Executor | None
    workers: int  # how many items can run at once
    where: str  # for log lines: "this machine" or the scheduler's address


def fingerprint() -> dict[str, object]:
    """This interpreter's code and library versions (run here and, through Dask, on every worker)."""
    digest = hashlib.sha256()
    for source in sorted(FLOWS.rglob("*.py")):
        digest.update(f"{source.relative_to(FLOWS).as_posix()}\n".encode())
        digest.update(source.read_bytes())
    return {"flows": digest.hexdigest(), "libraries": library_versions(*BYTE_LIBRARIES)}


def mismatches(local: dict[str, object], workers: dict[str, dict[str, object]]) -> list[str]:
    """One line per worker whose fingerprint differs from ``local``, saying what differs."""
    lines = []
    for worker, theirs in sorted(workers.items()):
        if theirs.get("flows") != local["flows"]:
            lines.append(f"{worker}: its flows/ code differs from this machine's")
        ours_libs, their_libs = local["libraries"], theirs.get("libraries", {})
        for name in sorted(ours_libs):
            if their_libs.get(name) != ours_libs[name]:
                lines.append(f"{worker}: {name} {their_libs.get(name, 'absent')}, here {ours_libs[name]}")
    return lines


def check_workers(client) -> int:
    """Raise :class:`ClusterError` unless every worker matches this machine; return the worker threads."""
    threads = client.nthreads()
    if not threads:
        raise ClusterError(f"cluster.address: the Dask scheduler at {client.scheduler.address} has no workers; "
                           f"start some (dask worker {client.scheduler.address})")
    try:
        theirs = client.run(fingerprint)
    except (ModuleNotFoundError, ImportError) as exc:
        raise ClusterError(f"cluster.address: the Dask workers cannot import this project ({exc}); "
                           f"install it on every worker (pip install -e .)") from None
    wrong = mismatches(fingerprint(), theirs)
    if wrong:
        raise ClusterError("cluster.address: these Dask workers would not return the same bytes as this machine "
                           f"(install this project's version on them): {'; '.join(wrong)}")
    return sum(threads.values())


@contextmanager
def connect(address: str, *, timeout_s: float):
    """A distributed Client of the scheduler at ``address``; :class:`ClusterError` if none answers."""
    from distributed import Client

    try:
        client = Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cluster.address: no Dask scheduler answered at {address} within {timeout_s:g} s "
                           f"({exc}); start one (dask scheduler), or set cluster.address: null to work "
                           f"on this machine") from None
    try:
        yield client
    finally:
        client.close()


@contextmanager
def work_pool(cluster: ClusterParams | None, *, local_workers: int) -> Iterator[Pool]:
    """The :class:`Pool` for ``cluster``: a Dask executor over its workers, or ``local_workers`` here.

    Here the executor is None: the caller keeps its own local way of running (a process pool made
    by flows.parallel.ordered_map, a thread pool of Prefect tasks).
    """
    if cluster is None or cluster.address is None:
        yield Pool(None, local_workers, "this machine")
        return
    with connect(cluster.address, timeout_s=cluster.connect_timeout_s) as client:
        threads = check_workers(client)
        executor = client.get_executor(pure=False)
        try:
            yield Pool(executor, threads, cluster.address)
        finally:
            executor.shutdown(wait=False)


def absolute_sources(sources: SourcesParams) -> SourcesParams:
    """``sources`` with every root made absolute, for work items that run in another process's folder."""
    return dataclasses.replace(sources, **{
        name: os.path.abspath(getattr(sources, name))
        for name in ("mvimgnet_root", "mvimgnet_mask_root", "mvimgnet_categories", "openimages_root",
                     "dreambench_root")})


__all__ = ["ClusterError", "Pool", "absolute_sources", "check_workers", "connect", "fingerprint", "mismatches",
           "work_pool"]

"""Order-preserving parallel map over a lazy iterable, with a bounded number of items in flight.

For CPU-bound per-item work (decode, resize, encode) inside one stage: the input is pulled
only as results are taken, so memory holds at most ``window`` items and results, whatever
the input's length, and results come back in input order, so outputs stay deterministic.
Workers are spawned, not forked: the parent runs Prefect's threads, which a fork would copy
mid-lock. ``fn`` must be a module-level function of picklable arguments.

The work can also go to an executor the caller owns (a Dask cluster's, flows.cluster): the
same bounded window and order, with ``workers`` the number of items it runs at once.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


def ordered_map(fn: Callable[[A], R], items: Iterable[tuple[T, A]], *, workers: int,
                window: int | None = None, executor: Executor | None = None) -> Iterator[tuple[T, R]]:
    """For each ``(tag, arg)`` of ``items`` yield ``(tag, fn(arg))``, in input order.

    Only ``arg`` travels to a worker; ``tag`` (anything the caller needs beside the result)
    stays here. ``workers`` <= 1 runs in this process, unless ``executor`` is given: then the
    work goes to it (left running at the end: the caller owns it) and ``workers`` only sizes the
    window. ``window``: items submitted but not yet yielded (default 4 per worker). An exception in ``fn`` is raised here at its item's
    turn; one from ``items`` is raised as soon as it is pulled (the results still pending
    are dropped). Either way pending work is cancelled and the workers end.

    Use it in a ``with contextlib.closing(ordered_map(...)) as results:`` block, so that an
    exception in the caller's loop also ends the workers at once (a generator left open by an
    exception lives as long as the traceback that holds it).
    """
    if workers <= 1 and executor is None:
        for tag, arg in items:
            yield tag, fn(arg)
        return
    window = window or 4 * max(workers, 1)
    own = executor is None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) if own \
        else executor
    pending: deque[tuple[T, Future]] = deque()
    try:
        for tag, arg in items:
            pending.append((tag, pool.submit(fn, arg)))
            if len(pending) >= window:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:  # left by an exception or by the caller closing early
            future.cancel()
        if own:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["ordered_map"]

import os

import pytest

from flows.parallel import ordered_map


def _square_and_pid(x: int) -> tuple[int, int]:
    if x == 13:
        raise ValueError("thirteen")
    return x * x, os.getpid()


def test_order_values_and_processes():
    out = list(ordered_map(_square_and_pid, ((i, i) for i in range(30) if i != 13), workers=2))
    assert [tag for tag, _ in out] == [i for i in range(30) if i != 13]
    assert all(value == tag * tag for tag, (value, _) in out)
    assert os.getpid() not in {pid for _, (_, pid) in out}  # the work ran in other processes


def test_one_worker_runs_in_this_process():
    out = list(ordered_map(_square_and_pid, [("a", 2), ("b", 3)], workers=1))
    assert out == [("a", (4, os.getpid())), ("b", (9, os.getpid()))]


def test_input_is_pulled_only_as_results_are_taken():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i, i

    results = ordered_map(_square_and_pid, items(), workers=2, window=4)
    next(results)
    assert len(pulled) <= 4  # at most one window in flight, not the whole input
    results.close()


def test_a_worker_error_is_raised_at_its_turn():
    seen = []
    with pytest.raises(ValueError, match="thirteen"):
        for tag, _ in ordered_map(_square_and_pid, ((i, i) for i in range(20)), workers=2):
            seen.append(tag)
    assert seen == list(range(13))


def test_closing_a_partly_read_map_ends_its_workers():
    import multiprocessing

    others = set(multiprocessing.active_children())  # e.g. the test session's Dask cluster
    results = ordered_map(_square_and_pid, ((i, i) for i in range(20)), workers=2)
    next(results)
    assert len(set(multiprocessing.active_children()) - others) == 2
    results.close()  # what contextlib.closing does when the caller's loop raises
    assert set(multiprocessing.active_children()) <= others

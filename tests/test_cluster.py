"""flows.cluster and flows.parallel.ordered_map on a real Dask cluster (scheduler and worker processes)."""

import os
import socket
import time
from contextlib import closing

import pytest

from flows.cluster import ClusterError, fingerprint, mismatches, work_pool
from flows.config.params import ClusterParams
from flows.config.typed import ParamsError
from flows.parallel import ordered_map

# Functions travel to the workers by reference: the local cluster's worker processes inherit this
# process's sys.path, so they import this module as pytest did.


def _square_and_pid(x: int) -> tuple[int, int]:
    if x == 13:
        raise ValueError("thirteen")
    return x * x, os.getpid()


def test_ordered_map_on_the_cluster_keeps_order_and_runs_on_its_workers(dask_cluster):
    with work_pool(ClusterParams(address=dask_cluster.scheduler_address), local_workers=1) as pool:
        assert pool.workers == 2 and pool.where == dask_cluster.scheduler_address
        items = ((i, i) for i in range(40) if i != 13)
        out = list(ordered_map(_square_and_pid, items, workers=pool.workers, executor=pool.executor))
    assert [tag for tag, _ in out] == [i for i in range(40) if i != 13]
    assert all(value == tag * tag for tag, (value, _) in out)
    pids = {pid for _, (_, pid) in out}
    assert os.getpid() not in pids and pids <= {w.pid for w in dask_cluster.workers.values()}


def test_a_worker_error_is_raised_at_its_turn_and_the_rest_is_cancelled(dask_cluster):
    seen = []
    with work_pool(ClusterParams(address=dask_cluster.scheduler_address), local_workers=1) as pool:
        with pytest.raises(ValueError, match="thirteen"):
            for tag, _ in ordered_map(_square_and_pid, ((i, i) for i in range(30)), workers=pool.workers,
                                      executor=pool.executor):
                seen.append(tag)
    assert seen == list(range(13))


def test_the_input_is_pulled_only_as_results_are_taken(dask_cluster):
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i, i

    with work_pool(ClusterParams(address=dask_cluster.scheduler_address), local_workers=1) as pool:
        with closing(ordered_map(_square_and_pid, items(), workers=pool.workers, executor=pool.executor,
                                 window=3)) as results:
            next(results)
            assert len(pulled) <= 3


def test_local_params_keep_the_work_here():
    with work_pool(ClusterParams(), local_workers=3) as pool:
        assert pool.executor is None and pool.workers == 3 and pool.where == "this machine"
    with work_pool(None, local_workers=1) as pool:
        assert pool.executor is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_scheduler_at_the_address_is_one_clear_error():
    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ClusterError, match=rf"cluster.address: no Dask scheduler answered at {address} within 1 s"):
        with work_pool(ClusterParams(address=address, connect_timeout_s=1), local_workers=1):
            pass
    assert time.monotonic() - start < 30


def test_workers_must_run_this_code_and_these_libraries():
    here = fingerprint()
    assert mismatches(here, {"tcp://a:1": here}) == []
    assert mismatches(here, {"tcp://a:1": {**here, "where": "/elsewhere/flows"}}) == []  # another folder is fine
    other = {"flows": "0" * 64, "libraries": {**here["libraries"], "pillow": "1.0"}, "where": "/old/checkout/flows"}
    lines = mismatches(here, {"tcp://a:1": other})
    assert lines == [f"tcp://a:1: its flows/ code (/old/checkout/flows) differs from this machine's ({here['where']})",
                     f"tcp://a:1: pillow 1.0, here {here['libraries']['pillow']}"]


def test_the_cluster_workers_pass_the_check(dask_cluster):
    from flows.cluster import check_workers, connect

    with connect(dask_cluster.scheduler_address, timeout_s=10) as client:
        checked = check_workers(client)
        assert set(checked) == set(client.nthreads()) and sorted(checked.values()) == [1, 1]


def test_workers_with_other_library_versions_are_refused_naming_them(dask_cluster, monkeypatch):
    import flows.cluster

    real = flows.cluster.library_versions
    # Here (and in the in-process scheduler) pillow now reads 0.0; the workers still report the real one.
    monkeypatch.setattr(flows.cluster, "library_versions", lambda *names: {**real(*names), "pillow": "0.0"})
    with pytest.raises(ClusterError, match=r"would not return the same bytes.*tcp://127\.0\.0\.1:\d+: pillow "
                                           r"\S+, here 0\.0"):
        with work_pool(ClusterParams(address=dask_cluster.scheduler_address), local_workers=1):
            pass


def test_a_port_that_accepts_but_never_answers_fails_within_the_timeout():
    with socket.socket() as silent:  # connections complete in the kernel's backlog; nothing ever replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ClusterError, match="no Dask scheduler answered"):
            with work_pool(ClusterParams(address=address, connect_timeout_s=1), local_workers=1):
                pass
        assert time.monotonic() - start < 20


@pytest.mark.parametrize("address", ["localhost:8786", "", "foo://h:1", "tcp://127.0.0.1"])
def test_a_malformed_address_is_refused(address):
    with pytest.raises(ParamsError, match="address: must be a scheduler address such as tcp://host:8786"):
        ClusterParams(address=address)


def test_a_worker_that_joins_after_the_check_gets_no_work():
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.WARNING) as cluster:
        first = {w.pid for w in cluster.workers.values()}
        with work_pool(ClusterParams(address=cluster.scheduler_address), local_workers=1) as pool:
            cluster.scale(2)
            cluster.wait_for_workers(2, timeout=60)
            out = list(ordered_map(_square_and_pid, ((i, i) for i in range(20) if i != 13), workers=2,
                                   executor=pool.executor))
        assert {pid for _, (_, pid) in out} == first  # the unchecked newcomer ran nothing


def _die(_: int) -> None:
    os._exit(1)  # the worker process dies; its nanny starts a new one at a new address


def test_losing_every_checked_worker_ends_the_work_in_one_error_instead_of_waiting_forever():
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.CRITICAL) as cluster:
        start = time.monotonic()
        with pytest.raises(ClusterError, match=r"every Dask worker checked at the start \(tcp://.*\) is gone"):
            with work_pool(ClusterParams(address=cluster.scheduler_address), local_workers=1) as pool:
                list(ordered_map(_die, [(0, 0)], workers=1, executor=pool.executor))
        assert time.monotonic() - start < 60

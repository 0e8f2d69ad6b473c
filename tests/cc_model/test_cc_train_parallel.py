"""Data-parallel training (train.processes): real torch.distributed processes (gloo on this CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cc_model.checkpoint import load_model
from cc_model.config import TrainParams
from cc_model.data import SubjectBatchSampler
from cc_model.training import RankBatches, Ranks, TrainProcessError, train_processes
from flows.config.params import Params

from conftest import params_for
from ddp_targets import save_with_weights_of_rank


def train(exported, out_dir, **options) -> dict:
    params = Params(model=params_for(), train=TrainParams(**{
        "batch_size": 2, "num_workers": 0, "avoid_near_duplicates": False, "device": "cpu", "processes": 2,
        "out_dir": str(out_dir), **options}))
    return train_processes(params, export_dir=exported / "export", embeddings=exported / "embeddings.parquet",
                           near_duplicates=exported / "near_duplicates.parquet")


def test_two_processes_train_in_step_and_a_resumed_run_ends_where_an_unbroken_one_does(exported, tmp_path):
    straight = train(exported, tmp_path / "straight", max_steps=3, save_every=1)
    # each step takes one batch of 2 per process; the processes' weights are checked equal at the end
    assert straight["processes"] == 2 and straight["steps"] == 3 and straight["samples"] == 12
    train(exported, tmp_path / "resumed", max_steps=2, save_every=1)
    resumed = train(exported, tmp_path / "resumed", max_steps=3, save_every=1)
    assert resumed["started_at_step"] == 2
    expected = load_model(tmp_path / "straight" / "checkpoint").trainable_state_dict()
    got = load_model(tmp_path / "resumed" / "checkpoint").trainable_state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
    assert (tmp_path / "resumed" / "loss.csv").read_text() == (tmp_path / "straight" / "loss.csv").read_text()


def test_an_error_to_fix_in_a_process_is_one_line(exported, tmp_path):
    with pytest.raises(TrainProcessError, match="train.batch_size"):
        train(exported, tmp_path / "run", max_steps=1, batch_size=1000)


def test_diverged_processes_never_save_a_state_a_rerun_could_finish_from(tmp_path):
    from cc_model.training import _free_port

    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="hold different weights"):
        torch.multiprocessing.spawn(save_with_weights_of_rank, args=(_free_port(), str(tmp_path)), nprocs=2)
    assert not (tmp_path / "state.pt").exists()


def test_the_processes_share_out_the_epochs_batches():
    groups = [range(i * 10, i * 10 + 10) for i in range(6)]
    subjects = np.arange(60) % 15
    inner = SubjectBatchSampler(groups, subjects, batch_size=4, seed=3)
    every = inner.batches()
    shares = [RankBatches(inner, Ranks(rank, 3)) for rank in range(3)]
    for share in shares:
        share.set_epoch(0)
    mine = [share.mine() for share in shares]
    used = len(every) // 3 * 3
    assert all(len(m) == used // 3 for m in mine)
    assert sorted(b for m in mine for b in map(tuple, m)) == sorted(map(tuple, every[:used]))
    assert shares[0].left_out == inner.left_out + (len(every) - used) * 4
    alone = RankBatches(inner, Ranks())
    alone.set_epoch(0, start=2)
    assert list(alone) == every[2:] and len(alone) == len(every) - 2

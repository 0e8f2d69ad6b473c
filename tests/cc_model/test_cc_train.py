"""The train stage's loop (cc_model.train) on exported shards: outputs, exact resume, fresh starts."""

from __future__ import annotations

import json

import pytest
import torch

from cc_model.checkpoint import load_model
from cc_model.config import TrainParams
from cc_model.train import STATE_NAME, train_model
from flows.config.params import Params

from conftest import params_for


def train(exported, out_dir, **options) -> dict:
    params = Params(model=params_for(), train=TrainParams(**{"batch_size": 2, "num_workers": 0,
                                                             "out_dir": str(out_dir), **options}))
    return train_model(params, export_dir=exported / "export", embeddings=exported / "embeddings.parquet")


def weights(out_dir) -> dict[str, torch.Tensor]:
    return load_model(out_dir / "checkpoint").trainable_state_dict()


def test_writes_a_loadable_checkpoint_stats_and_the_loss_curve(exported, tmp_path, make_model):
    stats = train(exported, tmp_path / "run", max_steps=3)
    assert stats["steps"] == 3 and stats["samples"] == 6 and stats["started_at_step"] == 0
    assert set(stats["loss_last_steps"]) == {"ldm", "cscl", "macl", "loc", "total"}
    assert json.loads((tmp_path / "run" / "stats.json").read_text())["steps"] == 3
    lines = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert lines[0].split(",")[0] == "step" and [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]
    trained = weights(tmp_path / "run")
    torch.manual_seed(0)  # the loop's own initialisation
    initial = make_model(params=params_for()).trainable_state_dict()
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)  # the steps changed the weights


def test_a_killed_run_resumes_to_the_unbroken_runs_weights(exported, tmp_path, monkeypatch):
    train(exported, tmp_path / "unbroken", max_steps=4, save_every=2)
    expected, expected_loss = weights(tmp_path / "unbroken"), (tmp_path / "unbroken" / "loss.csv").read_text()

    real_step, calls = torch.optim.AdamW.step, []

    def dies_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(exported, tmp_path / "broken", max_steps=4, save_every=2)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "broken" / ".work" / STATE_NAME).is_file()
    assert not (tmp_path / "broken" / "checkpoint").exists()
    stats = train(exported, tmp_path / "broken", max_steps=4, save_every=2)
    assert stats["started_at_step"] == 2 and stats["steps"] == 4
    resumed = weights(tmp_path / "broken")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert (tmp_path / "broken" / "loss.csv").read_text() == expected_loss

    train(exported, tmp_path / "longer", max_steps=2, save_every=2)  # a finished run, then more steps
    stats = train(exported, tmp_path / "longer", max_steps=4, save_every=2)
    assert stats["started_at_step"] == 2
    for name, value in expected.items():
        torch.testing.assert_close(weights(tmp_path / "longer")[name], value, rtol=0, atol=0)


def test_a_state_from_other_params_is_not_continued(exported, tmp_path):
    train(exported, tmp_path / "run", max_steps=2)
    assert train(exported, tmp_path / "run", max_steps=2, lr=1e-4)["started_at_step"] == 0
    assert train(exported, tmp_path / "run", max_steps=3, lr=1e-4, num_workers=1)["started_at_step"] == 2


def test_more_batch_than_samples_fails_in_one_line(exported, tmp_path):
    from cc_model.data import ExportDataError

    with pytest.raises(ExportDataError, match="fewer than train.batch_size"):
        train(exported, tmp_path / "run", max_steps=1, batch_size=10_000)

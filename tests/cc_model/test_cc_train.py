"""The train stage's loop (cc_model.train) on exported shards: outputs, exact resume, fresh starts."""

from __future__ import annotations

import json

import pytest
import torch

from cc_model.checkpoint import load_model
from cc_model.data import ExportDataError
from cc_model.config import TrainParams
from cc_model.training import STATE_NAME, train_model
from flows.config.params import Params

from conftest import params_for


def train(exported, out_dir, **options) -> dict:
    params = Params(model=params_for(), train=TrainParams(**{"batch_size": 2, "num_workers": 0,
                                                             "avoid_near_duplicates": False,
                                                             "out_dir": str(out_dir), **options}))
    return train_model(params, export_dir=exported / "export", embeddings=exported / "embeddings.parquet",
                       near_duplicates=exported / "near_duplicates.parquet",
                       hard_negatives=exported / "similarity" / "hard_negatives.parquet")


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
    # 24 steps of batch 2 over the fixture's 32 samples cross an epoch boundary on both sides of the kill
    unbroken = train(exported, tmp_path / "unbroken", max_steps=24, save_every=6)
    assert unbroken["epochs"] >= 1
    expected, expected_loss = weights(tmp_path / "unbroken"), (tmp_path / "unbroken" / "loss.csv").read_text()

    real_step, calls = torch.optim.AdamW.step, []

    def dies_at_step_19(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 19:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies_at_step_19)
    with pytest.raises(KeyboardInterrupt):
        train(exported, tmp_path / "broken", max_steps=24, save_every=6)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "broken" / ".work" / STATE_NAME).is_file()
    assert not (tmp_path / "broken" / "checkpoint").exists()
    stats = train(exported, tmp_path / "broken", max_steps=24, save_every=6)
    assert stats["started_at_step"] == 18 and stats["steps"] == 24
    resumed = weights(tmp_path / "broken")
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert (tmp_path / "broken" / "loss.csv").read_text() == expected_loss

    train(exported, tmp_path / "longer", max_steps=20, save_every=6)  # a finished run, then more steps
    stats = train(exported, tmp_path / "longer", max_steps=24, save_every=6)
    assert stats["started_at_step"] == 20
    for name, value in expected.items():
        torch.testing.assert_close(weights(tmp_path / "longer")[name], value, rtol=0, atol=0)


def test_a_state_from_other_params_or_shards_is_not_continued(exported, tmp_path, caplog):
    import os

    train(exported, tmp_path / "run", max_steps=2)
    with caplog.at_level("WARNING", logger="flows.train"):
        assert train(exported, tmp_path / "run", max_steps=2, lr=1e-4)["started_at_step"] == 0
    assert "starting afresh at step 0, the old state moved to" in caplog.text
    previous = torch.load(tmp_path / "run" / ".work" / "state.previous.pt", weights_only=True)
    assert previous["step"] == 2  # the lr=1e-5 run's state: kept, not overwritten
    assert train(exported, tmp_path / "run", max_steps=3, lr=1e-4, num_workers=1)["started_at_step"] == 2
    shard = sorted((exported / "export" / "train").glob("*.parquet"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a rewritten shard
    assert train(exported, tmp_path / "run", max_steps=3, lr=1e-4)["started_at_step"] == 0


def test_only_process_0_moves_a_mismatched_state_aside(tmp_path):
    # every DDP process loads the state; one moving it must not break the others' load
    from cc_model.training import Ranks, TrainingState

    torch.save({"key": "old"}, tmp_path / STATE_NAME)
    other = TrainingState(tmp_path, "new", Ranks(rank=1, world=2))
    assert other.load(None, None, None).step == 0 and (tmp_path / STATE_NAME).is_file()  # left for process 0
    assert TrainingState(tmp_path, "new", Ranks(rank=0, world=2)).load(None, None, None).step == 0
    assert not (tmp_path / STATE_NAME).exists() and (tmp_path / "state.previous.pt").is_file()
    assert other.load(None, None, None).step == 0  # a process that reads after the move starts afresh too


def test_the_resume_key_hashes_the_code_training_runs_not_evaluation():
    from cc_model.training import train_code

    code = set(train_code())
    assert {"cc_model/model.py", "cc_model/losses.py", "cc_model/train.py", "flows/pairs/augment.py",
            "flows/embed/preprocess.py"} <= code
    assert not {"cc_model/evaluate.py", "cc_model/inference.py", "cc_model/metrics.py",
                "cc_model/dreambench.py"} & code


def test_fewer_steps_than_the_saved_state_is_refused(exported, tmp_path):
    from cc_model.training import TrainStateError

    train(exported, tmp_path / "run", max_steps=3)
    with pytest.raises(TrainStateError, match="train.max_steps is 2 but the saved state .* has done 3 steps"):
        train(exported, tmp_path / "run", max_steps=2)


def test_near_duplicate_subjects_never_share_a_batch(exported, tmp_path):
    from flows.schemas import NEAR_DUPLICATES
    from flows.tables import iter_rows, write_table
    from flows.schemas import EXPORT

    subjects = sorted({r["subject_id"] for p in (exported / "export" / "train").glob("*.parquet")
                       for r in iter_rows(p, EXPORT)})
    pairs = [{"subject_a": a, "subject_b": b, "r": 0.99} for i, a in enumerate(subjects) for b in subjects[i + 1:]]
    write_table(exported / "near_duplicates.parquet", NEAR_DUPLICATES, pairs)  # every pair: no batch of 2 exists
    with pytest.raises(ExportDataError, match="no batch of 2 samples of different subjects"):
        train(exported, tmp_path / "run", max_steps=1, avoid_near_duplicates=True)
    assert train(exported, tmp_path / "run", max_steps=1)["steps"] == 1  # without the flags it trains


def test_batches_take_the_similarity_stages_hard_negatives(exported, tmp_path, caplog):
    from flows.config.params import SimilarityParams
    from flows.similarity.stage import compute_similarity

    compute_similarity(exported / "embeddings.parquet", exported / "similarity", SimilarityParams(k=4, hard_negatives=2))
    with caplog.at_level("INFO", logger="flows.train"):
        stats = train(exported, tmp_path / "run", max_steps=2, batch_size=4, hard_negatives_per_batch=1)
    assert stats["steps"] == 2 and 0 < stats["hard_negative_rows_last_epoch"] <= stats["train_samples"] // 4
    assert "rows are hard negatives" in caplog.text
    again = train(exported, tmp_path / "run", max_steps=2, batch_size=4, hard_negatives_per_batch=1)  # nothing to do
    assert again["steps_this_run"] == 0 and again["hard_negative_rows_last_epoch"] == stats["hard_negative_rows_last_epoch"]
    assert "hard_negative_rows_last_epoch" not in train(exported, tmp_path / "plain", max_steps=1)


def test_more_batch_than_subjects_fails_in_one_line(exported, tmp_path):
    with pytest.raises(ExportDataError, match="fewer than train.batch_size"):
        train(exported, tmp_path / "run", max_steps=1, batch_size=10_000)


def test_training_batch_fields(exported, make_model):
    from cc_model.backbones import clip_pixels
    from cc_model.data import dataset_for
    from cc_model.training import training_batch

    model = make_model(params=params_for())
    dataset = dataset_for(model, exported / "export", "train", embeddings=exported / "embeddings.parquet",
                          background_rgb=(124, 116, 104))
    raw = dataset.collate([dataset[0], dataset[5]])
    batch = training_batch(model, raw, device=torch.device("cpu"), dtype=torch.float32,
                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.reference_pixels, clip_pixels(raw["reference"], 32))
    torch.testing.assert_close(batch.positive_pixels, clip_pixels(raw["positive"], 32))
    assert torch.equal(batch.masks, raw["mask"]) and torch.equal(batch.input_ids, raw["input_ids"])
    assert torch.equal(batch.appearance_sim, raw["appearance_sim"])
    assert batch.noisy_latents.shape == batch.target.shape == (2, 4, 16, 16)
    assert batch.timesteps.dtype == torch.long and 0 <= int(batch.timesteps.min()) <= int(batch.timesteps.max()) < 1000

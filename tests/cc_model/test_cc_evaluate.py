"""The evaluate stage (cc_model.evaluate) and its metric models (cc_model.metrics)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cc_model.checkpoint import save_trainable
from cc_model.config import EvaluateParams, SamplingParams
from cc_model.metrics import dino_embeddings, load_dino, load_metric_models, random_dino
from flows.config.params import Params, SourcesParams
from flows.embed.clip_model import MissingCheckpointError

from conftest import params_for
from test_cc_dreambench import write_bench


def test_dino_loads_a_saved_folder_like_the_real_one(tmp_path):
    random_dino(seed=0).save_pretrained(tmp_path / "dino")  # config.json + model.safetensors, the hub layout
    loaded = load_dino(str(tmp_path / "dino"))
    models = load_metric_models(EvaluateParams(), torch.device("cpu"))  # tiny: the same random DINO
    images = [Image.new("RGB", (40, 30), (250, 20, 20)), Image.new("RGB", (30, 30), (20, 20, 250))]
    expected = dino_embeddings(models, images)
    models.dino = loaded.eval()
    torch.testing.assert_close(dino_embeddings(models, images), expected)
    with pytest.raises(MissingCheckpointError, match="no DINO model at .*hf download facebook/dino-vits16"):
        load_dino(str(tmp_path / "missing"))


def test_summary_means_by_kind_and_category():
    from cc_model.evaluate import summarise

    rows = [dict(subject="a", kind="reconstruction", category="reconstruction", clip_t=0.1, clip_i=0.9, dino_i=0.8),
            dict(subject="a", kind="editing", category="scene", clip_t=0.3, clip_i=0.7, dino_i=0.5),
            dict(subject="b", kind="editing", category="style", clip_t=0.5, clip_i=0.5, dino_i=0.3)]
    metrics = summarise(rows)
    assert metrics["CT"] == pytest.approx(0.4) and metrics["E-CI"] == pytest.approx(0.6)
    assert metrics["R-CI"] == pytest.approx(0.9) and metrics["R-DI"] == pytest.approx(0.8)
    assert metrics["E-DI"] == pytest.approx(0.4) and metrics["subjects"] == 2 and metrics["images"] == 3
    assert metrics["by_category"]["style"] == {"CT": 0.5, "E-CI": 0.5, "E-DI": 0.3, "images": 1}


@pytest.fixture
def evaluated(tmp_path, make_model):
    """A tiny checkpoint evaluated on a three-subject DreamBench, in batches of 4."""
    torch.manual_seed(0)
    save_trainable(make_model(params=params_for()), tmp_path / "ckpt")
    root = write_bench(tmp_path / "db")

    def run(out: str, **options):
        params = Params(sources=SourcesParams(dreambench_root=str(root)),
                        sampling=SamplingParams(steps=2),
                        evaluate=EvaluateParams(out_dir=str(tmp_path / out), **{"batch_size": 4, **options}))
        from cc_model.evaluate import evaluate_checkpoint

        return evaluate_checkpoint(params, checkpoint=tmp_path / "ckpt"), tmp_path / out

    return run


def test_every_subject_and_prompt_is_generated_and_scored(evaluated):
    metrics, out = evaluated("eval", images_per_prompt=2)
    table = pq.read_table(out / "scores.parquet").to_pylist()
    # backpack, red_cartoon: 1 + 3 object prompts; cat2 (live): 1 + 4 live prompts; 2 images each
    assert len(table) == metrics["images"] == 2 * (4 + 4 + 5) and metrics["subjects"] == 3
    assert len({r["seed"] for r in table}) == len(table)
    assert {r["kind"] for r in table} == {"reconstruction", "editing"}
    assert {r["category"] for r in table if r["subject"] == "cat2"} == {"reconstruction", "scene", "accessorisation",
                                                                         "style"}
    recon = [r for r in table if r["kind"] == "reconstruction"]
    assert all(r["prompt"] == f"a photo of a sks {r['class_name']}" for r in recon)  # the training caption
    for r in table:
        assert -1 <= r["clip_t"] <= 1 and -1 <= r["clip_i"] <= 1 and -1 <= r["dino_i"] <= 1
        assert Image.open(__import__("io").BytesIO(r["image_jpeg"])).size == (32, 32)
    assert metrics["random_weights"] is True and metrics["subject_segmentation"].startswith("SAM")
    assert json.loads((out / "stats.json").read_text())["CT"] == metrics["CT"]
    assert Image.open(out / "grid.png").size[1] >= 32


def test_sam_boxes_come_from_the_subject_location():
    import numpy as np

    from cc_model.evaluate import BOX_MARGIN, location_box

    location = np.zeros((8, 8), dtype=bool)
    location[2:4, 5:8] = True  # rows 2-3, columns 5-7 of an 8x8 latent grid
    np.testing.assert_allclose(location_box(location, 64, 32), [[40.0, 8.0, 64.0, 16.0]])  # scaled x8 and x4
    whole = [[BOX_MARGIN * 64, BOX_MARGIN * 32, (1 - BOX_MARGIN) * 64, (1 - BOX_MARGIN) * 32]]
    for nothing in (None, np.zeros((8, 8), bool), np.ones((8, 8), bool)):  # no location, empty, everywhere
        np.testing.assert_allclose(location_box(nothing, 64, 32), whole)


def test_generated_images_are_cut_out_around_their_subject_location(evaluated, monkeypatch):
    from cc_model import evaluate
    from flows.segment.sam_infer import SamRunner

    boxes, real = [], SamRunner.segment

    def spy(self, prompts):
        boxes.extend(p.boxes[0].tolist() for p in prompts)
        return real(self, prompts)

    located = []
    real_generate = evaluate.generate

    def generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        located.extend(None if out.location is None else list(out.location.bool().numpy()))
        return out

    monkeypatch.setattr(SamRunner, "segment", spy)
    monkeypatch.setattr(evaluate, "generate", generate)
    metrics, _ = evaluated("located", images_per_prompt=1)
    generated = boxes[-len(located):]  # the photos are cut first, when the scorer is built
    assert len(located) == metrics["images"] and any(loc is not None and loc.any() and not loc.all() for loc in located)
    for loc, box in zip(located, generated):
        assert box == evaluate.location_box(loc, 32, 32)[0].tolist()
    assert "subject location" in metrics["subject_segmentation"]


def test_segment_subjects_switches_the_metrics_not_the_conditioning(evaluated):
    # the model is conditioned on SAM's cut-out of the photo, as it trained, whatever the metrics compare
    _, cut = evaluated("cut", images_per_prompt=1)
    metrics, whole = evaluated("whole", images_per_prompt=1, segment_subjects=False)

    def images(out):
        return [r["image_jpeg"] for r in pq.read_table(out / "scores.parquet").to_pylist()]

    assert images(cut) == images(whole)
    assert metrics["subject_segmentation"].startswith("none for the metrics")


def test_an_image_does_not_depend_on_its_batch(evaluated):
    _, four = evaluated("four", segment_subjects=False)
    _, one = evaluated("one", segment_subjects=False, batch_size=1)
    a, b = pq.read_table(four / "scores.parquet").to_pylist(), pq.read_table(one / "scores.parquet").to_pylist()
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    for x, y in zip(a, b):
        assert x["clip_i"] == pytest.approx(y["clip_i"], abs=1e-4) and x["clip_t"] == pytest.approx(y["clip_t"], abs=1e-4)


def test_an_interrupted_evaluation_keeps_its_finished_pieces(evaluated, monkeypatch):
    import cc_model.evaluate as evaluate

    monkeypatch.setattr(evaluate, "PIECE_BATCHES", 2)  # pieces of 2 batches of 2 images: 4 pieces for 13 images
    _, clean = evaluated("clean", batch_size=2, segment_subjects=False, images_per_prompt=1)
    real_score, calls, kill = evaluate.Scorer.score, [], [True]

    def dies_in_the_third_piece(self, batch):
        calls.append(len(batch))
        if kill[0] and len(calls) == 5:
            raise RuntimeError("killed")
        return real_score(self, batch)

    monkeypatch.setattr(evaluate.Scorer, "score", dies_in_the_third_piece)
    with pytest.raises(RuntimeError, match="killed"):
        evaluated("resumed", batch_size=2, segment_subjects=False, images_per_prompt=1)
    calls.clear()
    kill[0] = False
    metrics, resumed = evaluated("resumed", batch_size=2, segment_subjects=False, images_per_prompt=1)
    assert calls == [2, 2, 1]  # only the last two pieces: 8 of 13 images were kept
    assert pq.read_table(resumed / "scores.parquet").to_pylist() == pq.read_table(clean / "scores.parquet").to_pylist()
    assert json.loads((resumed / "timing.json").read_text())["images_generated"] == 5
    assert not (resumed / ".work").exists()

"""The segment stage through its plain functions: provided masks, tiny SAM, refine, accounting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from flows import reasons
from flows.schemas import FRAMES, MASKS, REJECTS
from flows.segment import stage
from flows.segment.masks import decode_rle
from flows.segment.stage import refine_decision
from flows.tables import iter_rows


def _run(data, tiny_runner, **changes):
    params = dataclasses.replace(data.params, **changes)
    stats = stage.segment_frames(Path(data.filtering.out_dir), Path(params.out_dir), sources=data.sources,
                                 params=params, runner=lambda: tiny_runner)
    out = Path(params.out_dir)
    masks = {row["frame_id"]: row for row in iter_rows(out / "masks.parquet", MASKS)}
    rejects = {row["item_id"]: row for row in iter_rows(out / "rejects.parquet", REJECTS)}
    return stats, masks, rejects


def test_every_frame_ends_in_masks_or_rejects_in_input_order(segment_data, tiny_runner):
    stats, masks, rejects = _run(segment_data, tiny_runner)
    ids = [row["frame_id"] for row in segment_data.rows]
    assert set(masks) | set(rejects) == set(ids) and not set(masks) & set(rejects)
    assert list(masks) == [i for i in ids if i in masks]  # stable order = input order
    assert stats["input_frames"] == len(ids) == stats["masks"] + stats["rejected"]
    assert json.loads((Path(segment_data.params.out_dir) / "stats.json").read_text()) == stats
    for frame_id, reason in segment_data.faults.items():
        assert rejects[frame_id]["reason"] == reason and rejects[frame_id]["stage"] == "segment"
    assert all(r["reason"] in reasons.SEGMENT_REASONS for r in rejects.values())


def test_provided_masks_equal_the_ground_truth_at_image_size(segment_data, tiny_runner):
    _, masks, _ = _run(segment_data, tiny_runner)
    for frame_id, truth in segment_data.expected.items():
        row = masks[frame_id]
        decoded = decode_rle(row["rle_counts"], width=row["width"], height=row["height"])
        assert decoded.shape == truth.shape and np.array_equal(decoded, truth)
        assert (row["method"], row["quality"], row["model_id"]) == ("provided", 1.0, None)
        assert row["area_frac"] == pytest.approx(truth.mean())


def test_frames_without_a_mask_are_segmented_by_tiny_sam(segment_data, tiny_runner, caplog):
    stats, masks, rejects = _run(segment_data, tiny_runner)
    assert stats["sam"]["random_weights"] is True
    for frame_id in segment_data.sam_frames:
        if frame_id in rejects:  # random weights may find nothing: then the frame says so
            assert rejects[frame_id]["reason"] == reasons.EMPTY_MASK
            continue
        row = masks[frame_id]
        assert row["method"] == "sam_box" and row["model_id"] == "sam:tiny:random-seed0"
        assert 0.0 <= row["quality"] <= 1.0 and 0.0 < row["area_frac"] <= 1.0
        assert decode_rle(row["rle_counts"], width=row["width"], height=row["height"]).shape == (80, 120)


def test_the_image_encoder_runs_once_per_image_for_all_its_boxes(segment_data, tiny_runner):
    calls = []
    hook = tiny_runner.model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        _run(segment_data, tiny_runner, mode="refine", frames_per_shard=100)
    finally:
        hook.remove()
    # refine sends every decodable image to SAM: 2 MVImgNet frames (one mask missing: rejected
    # before SAM, so that image is not encoded), abc123 (2 boxes), def456; bad999 never decodes.
    assert sum(calls) == 3 and all(n <= segment_data.params.batch_images for n in calls)


def test_refine_keeps_sams_mask_only_when_it_gains_enough(segment_data, tiny_runner):
    refined = [fid for fid in segment_data.expected]
    stats, masks, _ = _run(segment_data, tiny_runner, mode="refine", refine_min_gain=-1.0)  # SAM always wins
    assert stats["refine"] == {"compared": 2, "replaced": 2}
    assert all(masks[fid]["method"] == "sam_refined" for fid in refined)
    stats, masks, _ = _run(segment_data, tiny_runner, mode="refine", refine_min_gain=2.0)  # SAM never wins
    assert stats["refine"] == {"compared": 2, "replaced": 0}
    for frame_id, truth in segment_data.expected.items():
        row = masks[frame_id]
        assert row["method"] == "provided"
        assert np.array_equal(decode_rle(row["rle_counts"], width=row["width"], height=row["height"]), truth)


def test_refine_decision():
    assert refine_decision(sam_stability=0.95, provided_score=0.90, sam_area=0.2, min_gain=0.02)
    assert not refine_decision(sam_stability=0.91, provided_score=0.90, sam_area=0.2, min_gain=0.02)
    assert not refine_decision(sam_stability=0.99, provided_score=0.10, sam_area=0.0, min_gain=0.02)
    assert not refine_decision(sam_stability=0.99, provided_score=float("nan"), sam_area=0.2, min_gain=0.02)


def test_shards_end_only_between_images(segment_data, tmp_path):
    shards = stage.plan_shards(Path(segment_data.filtering.out_dir) / "frames.parquet", tmp_path / "w",
                               frames_per_shard=3)
    parts = [[row["image_path"] for row in iter_rows(shard, FRAMES)] for shard in shards]
    assert sum(parts, []) == [row["image_path"] for row in segment_data.rows]
    assert parts[0][-2:] == ["train/abc123.jpg", "train/abc123.jpg"]  # not cut at 3 rows
    seen = [set(p) for p in parts]
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])


def test_provided_only_shards_load_no_model(segment_data):
    def no_model():
        raise AssertionError("the model was built for provided masks")

    keep = [row for row in segment_data.rows if row["mask_path"] is not None]
    segment_data.rows = keep
    segment_data.write()
    stats = stage.segment_frames(Path(segment_data.filtering.out_dir), Path(segment_data.params.out_dir),
                                 sources=segment_data.sources, params=segment_data.params, runner=no_model)
    assert stats["sam"] is None and stats["input_frames"] == len(keep)

"""The segment stage through its plain functions: provided masks, tiny SAM, refine, accounting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows import reasons
from flows.config.params import AreaRange
from flows.schemas import FRAMES, MASKS, REJECTS
from flows.segment import stage
from flows.segment.masks import decode_rle
from flows.segment.sam_infer import ImageMasks
from flows.segment.stage import refine_decision
from flows.tables import iter_rows


def _run(data, tiny_runner, filtering=None, **changes):
    params = dataclasses.replace(data.params, **changes)
    stats = stage.segment_frames(Path(data.filtering.out_dir), Path(params.out_dir), sources=data.sources,
                                 params=params, filtering=filtering or data.filtering, runner=lambda: tiny_runner)
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


# Filter thresholds that any non-empty mask passes: the refine tests below that are about stability alone.
PASS_ALL = dict(mvimgnet_area=AreaRange(min=0.0, max=1.0), openimages_area=AreaRange(min=0.0, max=1.0),
                min_box_side=0, box_aspect_min=0.0, box_aspect_max=float("inf"), min_largest_component=0.0)


def test_refine_keeps_sams_mask_only_when_it_gains_enough(segment_data, tiny_runner):
    refined = [fid for fid in segment_data.expected]
    permissive = dataclasses.replace(segment_data.filtering, **PASS_ALL)
    stats, masks, _ = _run(segment_data, tiny_runner, permissive, mode="refine", refine_min_gain=-1.0)  # SAM wins
    assert stats["refine"] == {"compared": 2, "replaced": 2, "rejected_by_filters": 0}
    assert all(masks[fid]["method"] == "sam_refined" for fid in refined)
    stats, masks, _ = _run(segment_data, tiny_runner, permissive, mode="refine", refine_min_gain=2.0)  # never
    assert stats["refine"] == {"compared": 2, "replaced": 0, "rejected_by_filters": 0}
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


class _Done:
    def __init__(self, answers):
        self.answers = answers

    def result(self):
        return self.answers


class ScriptedSam:
    """A SAM stand-in: for a box with a provided mask it answers ``refined(provided)`` with a
    stability (0.99) far above the provided mask's (0.5), so refine_decision always prefers it;
    for a box alone, the box filled."""

    model_id, random_weights, device = "sam:scripted", False, "cpu"

    def __init__(self, refined):
        self.refined = refined

    @staticmethod
    def resize(rgb):
        return rgb

    def launch(self, images):
        answers = []
        for im in images:
            masks = []
            for box, provided in zip(im.boxes, im.mask_prompts):
                if provided is None:
                    mask = np.zeros(im.original_size, dtype=bool)
                    x0, y0, x1, y1 = np.round(box).astype(int)
                    mask[y0:y1, x0:x1] = True
                else:
                    mask = self.refined(provided)
                masks.append(mask)
            k = len(masks)
            answers.append(ImageMasks(
                masks=np.asfortranarray(np.stack(masks, axis=-1).astype(np.uint8)),
                stability=np.full(k, 0.99, dtype=np.float32), iou_pred=np.full(k, 0.9, dtype=np.float32),
                prompted_stability=np.array([np.nan if p is None else 0.5 for p in im.mask_prompts],
                                            dtype=np.float32)))
        return _Done(answers)


class EmptyBoxSam(ScriptedSam):
    """ScriptedSam that finds no subject pixel when prompted with a box alone."""

    def launch(self, images):
        answers = super().launch(images).result()
        for im, answer in zip(images, answers):
            for k, provided in enumerate(im.mask_prompts):
                if provided is None:
                    answer.masks[:, :, k] = 0
        return _Done(answers)


def test_an_empty_box_only_sam_mask_is_an_empty_mask_reject(segment_data):
    stats, masks, rejects = _run(segment_data, EmptyBoxSam(_eroded))
    assert segment_data.sam_frames
    for frame_id in segment_data.sam_frames:
        assert frame_id not in masks
        assert (rejects[frame_id]["reason"], rejects[frame_id]["stage"]) == (reasons.EMPTY_MASK, "segment")
    assert masks and all(row["area_frac"] > 0 for row in masks.values())
    assert stats["input_frames"] == stats["masks"] + stats["rejected"]


def _whole_image(provided):
    return np.ones_like(provided)  # area 1.0 > filter.*_area.max


def _cut_in_two(provided):
    """The provided mask with a 2-px vertical cut at its middle: two halves, neither 0.9 of it."""
    cut = provided.copy()
    cols = np.flatnonzero(provided.any(axis=0))
    middle = (cols[0] + cols[-1]) // 2
    cut[:, middle - 1:middle + 1] = False
    return cut


def _a_few_pixels(provided):
    rows, cols = np.nonzero(provided)
    small = np.zeros_like(provided)
    small[rows[len(rows) // 2], cols[len(cols) // 2]] = True  # 1 pixel < filter.*_area.min
    return small


def _eroded(provided):
    return cv2.erode(provided.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)


# The fixture's images are small (96x72, 120x80): box sides are kept out of the way except where tested.
SMALL_BOXES = dict(min_box_side=8)


MV, OI = "mvimgnet:7/0a0b0c0d/000.jpg", "openimages:abc123/box0"  # the fixture's frames with a provided mask


@pytest.mark.parametrize("refined, failures", [
    (_whole_image, {MV: reasons.SUBJECT_TOO_LARGE, OI: None}),  # OpenImages' area rule reads the box
    (_cut_in_two, {MV: reasons.MASK_FRAGMENTED, OI: None}),  # connectedness is AnyDoor's MVImgNet rule
    (_a_few_pixels, {MV: reasons.SUBJECT_TOO_SMALL, OI: None}),
])
def test_refine_keeps_the_provided_mask_when_sams_fails_the_filters_mask_rules(segment_data, refined, failures):
    """SAM's mask is more stable, but where it would not have passed the filter the provided mask stays."""
    filtering = dataclasses.replace(segment_data.filtering, **SMALL_BOXES)
    frames = {row["frame_id"]: row for row in segment_data.rows}
    assert set(failures) == set(segment_data.expected)
    for frame_id, truth in segment_data.expected.items():  # the rule that SAM's mask fails, as filter sees it
        failure = stage.sam_mask_failure(frames[frame_id], refined(truth), filtering)
        assert (failure and failure[0]) == failures[frame_id]
        assert stage.sam_mask_failure(frames[frame_id], truth, filtering) is None
    stats, masks, _ = _run(segment_data, ScriptedSam(refined), filtering, mode="refine")
    kept = {frame_id for frame_id, reason in failures.items() if reason is not None}
    assert stats["refine"] == {"compared": 2, "replaced": 2 - len(kept), "rejected_by_filters": len(kept)}
    assert stats["methods"]["sam_refined"] == 2 - len(kept)
    for frame_id, truth in segment_data.expected.items():
        row = masks[frame_id]
        decoded = decode_rle(row["rle_counts"], width=row["width"], height=row["height"])
        if frame_id in kept:
            assert (row["method"], row["quality"], row["model_id"]) == ("provided", 1.0, None)
            assert np.array_equal(decoded, truth)
        else:
            assert (row["method"], row["model_id"]) == ("sam_refined", "sam:scripted")
            assert np.array_equal(decoded, refined(truth))


def test_refine_replaces_the_provided_mask_when_sams_passes_the_filters_mask_rules(segment_data):
    filtering = dataclasses.replace(segment_data.filtering, **SMALL_BOXES)
    stats, masks, _ = _run(segment_data, ScriptedSam(_eroded), filtering, mode="refine")
    assert stats["refine"] == {"compared": 2, "replaced": 2, "rejected_by_filters": 0}
    for frame_id, truth in segment_data.expected.items():
        row = masks[frame_id]
        assert (row["method"], row["model_id"]) == ("sam_refined", "sam:scripted")
        assert row["quality"] == pytest.approx(0.99)
        decoded = decode_rle(row["rle_counts"], width=row["width"], height=row["height"])
        assert np.array_equal(decoded, _eroded(truth)) and not np.array_equal(decoded, truth)


def _fail_at(monkeypatch, shard_name):
    """segment_shard raises once, when it reaches ``shard_name``; returns the list of shards it was called for."""
    real, calls, failed = stage.segment_shard, [], []

    def flaky(shard, *args, **kwargs):
        calls.append(shard.name)
        if shard.name == shard_name and not failed:
            failed.append(shard_name)
            raise RuntimeError("the machine went away")
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(stage, "segment_shard", flaky)
    return calls


def test_a_failed_run_keeps_its_finished_shards_and_the_rerun_does_only_the_rest(segment_data, tiny_runner,
                                                                                  monkeypatch, tmp_path):
    planned = stage.plan_shards(Path(segment_data.filtering.out_dir) / "frames.parquet", tmp_path / "plan",
                                frames_per_shard=2)
    assert len(planned) >= 3
    clean = _run(segment_data, tiny_runner, frames_per_shard=2)
    work = Path(segment_data.params.out_dir) / ".work"
    assert not work.exists()  # a finished run leaves no work folder
    for name in ("masks.parquet", "rejects.parquet", "stats.json"):
        (Path(segment_data.params.out_dir) / name).unlink()

    last = planned[-1].name
    calls = _fail_at(monkeypatch, last)
    with pytest.raises(RuntimeError, match="went away"):
        _run(segment_data, tiny_runner, frames_per_shard=2)
    assert not (Path(segment_data.params.out_dir) / "masks.parquet").exists()
    assert sorted(p.name.removesuffix(".done.json") for p in work.glob("shard-*.done.json")) == [
        shard.name for shard in planned[:-1]]
    calls.clear()
    assert _run(segment_data, tiny_runner, frames_per_shard=2) == clean
    assert calls == [last] and not work.exists()  # only the unfinished shard ran again


def test_work_of_other_params_is_not_resumed(segment_data, tiny_runner, monkeypatch, tmp_path):
    planned = stage.plan_shards(Path(segment_data.filtering.out_dir) / "frames.parquet", tmp_path / "plan",
                                frames_per_shard=2)
    calls = _fail_at(monkeypatch, planned[1].name)
    with pytest.raises(RuntimeError):
        _run(segment_data, tiny_runner, frames_per_shard=2)
    calls.clear()
    _run(segment_data, tiny_runner, frames_per_shard=2, refine_min_gain=0.5)  # another key: every shard again
    assert calls == [shard.name for shard in planned]


def test_sam_is_needed_in_refine_mode_or_for_frames_without_a_provided_mask(segment_data, tmp_path):
    frames = Path(segment_data.filtering.out_dir) / "frames.parquet"
    assert stage.needs_sam(frames, segment_data.params)  # the fixture has frames without a mask
    segment_data.rows = [row for row in segment_data.rows if row["mask_path"] is not None]
    segment_data.write()
    assert not stage.needs_sam(frames, segment_data.params)
    assert stage.needs_sam(frames, dataclasses.replace(segment_data.params, mode="refine"))
    assert not stage.needs_sam(tmp_path / "absent.parquet", segment_data.params)

"""mine_multiview (all frame pairs at once) against the pair-by-pair loop it replaced."""

import dataclasses
import math

import numpy as np
import pytest

from flows.config.params import PairsParams
from flows.pairs.augment import recipe_seed
from flows.pairs.join import SubjectFrame
from flows.pairs.mining import _row, _view_dir, cosine, fallback_gap, mine_multiview


def reference_mine_multiview(frames, params, *, captured=None):
    """The former implementation, kept literally: every (i, j) judged one at a time."""
    dirs = [_view_dir(f.qvec) for f in frames]
    min_gap = fallback_gap(frames, captured)
    pairs = []
    for i, ref in enumerate(frames):
        candidates = []
        for j, other in enumerate(frames):
            if j == i:
                continue
            gap = abs((ref.frame_index or 0) - (other.frame_index or 0))
            if dirs[i] is not None and dirs[j] is not None:
                angle = float(np.degrees(np.arccos(np.clip(np.dot(dirs[i], dirs[j]), -1.0, 1.0))))
                if angle >= params.min_angle_deg:
                    candidates.append((j, angle, gap))
            elif gap >= min_gap:
                candidates.append((j, None, gap))
        rng = np.random.default_rng(recipe_seed(ref.frame_id, 0, params.seed))
        chosen = sorted(rng.permutation(len(candidates))[: params.max_positives_per_frame].tolist())
        for c in chosen:
            j, angle, gap = candidates[c]
            pos = frames[j]
            pairs.append(_row(ref, kind="multiview", pair=f"{ref.frame_id}->{pos.frame_id}",
                              positive_frame_id=pos.frame_id, angle_deg=angle, frame_gap=gap,
                              area_ratio=pos.area_frac / ref.area_frac if ref.area_frac else 0.0,
                              r_ij=cosine(ref.embedding, pos.embedding)))
    return pairs


def _frame(subject, k, qvec, index, rng, d=16):
    e = rng.normal(size=d)
    return SubjectFrame(f"{subject}/{k:03d}.jpg", subject, "mvimgnet", "cup", "p", index, qvec, (0.1, 0.1, 0.5, 0.5),
                        float(rng.uniform(0.0, 0.5)) if k % 7 else 0.0, (e / np.linalg.norm(e)).astype(np.float16),
                        b"", (1, 1))


def _about_y(theta_deg):
    """Quaternion (w, x, y, z) of a turn about the y axis: views at theta apart are theta apart."""
    half = math.radians(theta_deg) / 2
    return (math.cos(half), 0.0, math.sin(half), 0.0)


def _random_object(rng, n, threshold):
    subject = f"mvimgnet:1/{rng.integers(1 << 30):08x}"
    indices = rng.permutation(3 * n)[:n].tolist()
    frames = []
    for k in range(n):
        kind = rng.integers(4)
        if kind == 0:
            qvec = None  # no pose: the frame-gap fallback
        elif kind == 1:  # on a ring at multiples of the threshold, a hair off: angles at the threshold
            qvec = _about_y(int(rng.integers(0, 7)) * threshold + float(rng.choice([0.0, 1e-13, -1e-13, 1e-9, -1e-9])))
        else:
            qvec = tuple(rng.normal(size=4))
        index = None if rng.uniform() < 0.1 else indices[k]
        frames.append(_frame(subject, k, qvec, index, rng))
    return frames


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {**g, "angle_deg": None} == {**w, "angle_deg": None}
        assert type(g["frame_gap"]) is type(w["frame_gap"]) is int
        if w["angle_deg"] is None:
            assert g["angle_deg"] is None
        else:  # one matrix product vs np.dot per pair: the last bit of float64 may differ
            assert g["angle_deg"] == pytest.approx(w["angle_deg"], rel=0, abs=1e-9)
            assert type(g["angle_deg"]) is float


@pytest.mark.parametrize("threshold,max_positives", [(30.0, 2), (60.0, 1), (45.0, 100), (0.0, 3)])
def test_vectorised_multiview_matches_the_pairwise_loop(threshold, max_positives):
    params = PairsParams(min_angle_deg=threshold, max_positives_per_frame=max_positives, seed=7)
    rng = np.random.default_rng(int(threshold) * 1000 + max_positives)
    for trial in range(40):
        n = int(rng.integers(1, 40))
        frames = _random_object(rng, n, threshold)
        captured = None if trial % 3 == 0 else n + int(rng.integers(0, 3 * n))
        _assert_same(mine_multiview(frames, params, captured=captured),
                     reference_mine_multiview(frames, params, captured=captured))


def test_vectorised_multiview_at_the_threshold_exactly():
    # views on a ring 30 deg apart, some a hair off: many angles sit within 1e-12 of the threshold
    rng = np.random.default_rng(3)
    offsets = [0.0, 1e-13, -1e-13, 2e-14, -2e-14, 1e-9, -1e-9]
    frames = [_frame("mvimgnet:1/ring", k, _about_y(k * 30.0 + offsets[k % len(offsets)]), k, rng) for k in range(24)]
    for threshold in (30.0, 60.0, 90.0):
        params = PairsParams(min_angle_deg=threshold, max_positives_per_frame=50)
        _assert_same(mine_multiview(frames, params), reference_mine_multiview(frames, params))


def test_vectorised_multiview_with_the_threshold_at_an_angle_of_the_object():
    # min_angle_deg equal to a pair's angle (as the loop computes it): that pair is in, to the last bit
    rng = np.random.default_rng(11)
    frames = [_frame("mvimgnet:1/posed", k, tuple(rng.normal(size=4)), k, rng) for k in range(12)]
    dirs = [_view_dir(f.qvec) for f in frames]
    angles = {float(np.degrees(np.arccos(np.clip(np.dot(dirs[i], dirs[j]), -1.0, 1.0))))
              for i in range(len(frames)) for j in range(len(frames)) if i != j}
    for threshold in sorted(angles):
        params = PairsParams(min_angle_deg=threshold, max_positives_per_frame=len(frames))
        _assert_same(mine_multiview(frames, params), reference_mine_multiview(frames, params))


def test_vectorised_multiview_without_any_pose_or_index():
    rng = np.random.default_rng(5)
    frames = [_frame("mvimgnet:1/none", k, None, None if k % 2 else k, rng) for k in range(12)]
    for params in (PairsParams(), dataclasses.replace(PairsParams(), max_positives_per_frame=11)):
        for captured in (None, 12, 40):
            _assert_same(mine_multiview(frames, params, captured=captured),
                         reference_mine_multiview(frames, params, captured=captured))

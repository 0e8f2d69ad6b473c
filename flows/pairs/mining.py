"""Positive pairs for MACL: other views of one object, or augmentation recipes of one box.

r_ij is the cosine of the two segmented-subject embeddings exactly as stored (float16
values, summed in float32), so it can be recomputed from the embeddings table; it is
clipped to [-1, 1], which float16 norms overshoot by up to ~1e-3.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from flows import ids
from flows.config.params import PairsParams
from flows.pairs.augment import make_recipe, recipe_seed
from flows.pairs.join import SubjectFrame
from flows.readers.colmap import qvec_to_rotmat
from flows.splits import SplitRule

ANGLE_BINS = tuple(range(0, 181, 15))  # histogram edges of the viewing-angle distribution


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """r_ij: dot product of two stored (normalised, float16) embeddings, in float32, within [-1, 1]."""
    return clip_cosine(np.dot(a.astype(np.float32), b.astype(np.float32)))


def clip_cosine(value) -> float:
    return float(min(1.0, max(-1.0, value)))


def _view_dir(qvec) -> np.ndarray | None:
    # COLMAP x_cam = R x_world + t: the optical axis in world coordinates is R^T [0, 0, 1].
    return None if qvec is None else qvec_to_rotmat(qvec)[2]


def fallback_gap(frames: list[SubjectFrame], captured: int | None) -> int:
    """AnyDoor's frame gap without poses: len(frames) // 8 of the whole capture, at least 1."""
    return max(1, max(captured or 0, len(frames)) // 8)


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two unit viewing directions in degrees, one pair at a time (the reference formula)."""
    return float(np.degrees(np.arccos(np.clip(np.dot(a, b), -1.0, 1.0))))


# One matrix product may round a dot product differently from np.dot of the two vectors (last
# bit). Pairs whose dot lies this close to cos(min_angle_deg), or to +-1 where arccos magnifies
# that bit to ~1e-6 deg, get the pair-by-pair formula: the threshold then decides exactly as it
# did pair by pair, and every angle agrees with it to ~1e-10 deg.
RECHECK_DOT = 1e-9


def _multiview_candidates(frames: list[SubjectFrame], params: PairsParams,
                          captured: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(candidate, angles, gaps, both_posed), each (n, n) over the object's frames.

    candidate[i, j]: j is a positive of i (never j == i): with poses on both sides, an angle of
    at least min_angle_deg; else a frame gap of at least fallback_gap. angles in degrees (NaN
    where a side has no pose), gaps = |frame_index_i - frame_index_j| (None counting as 0).
    """
    n = len(frames)
    dirs = [_view_dir(f.qvec) for f in frames]
    posed = np.array([d is not None for d in dirs], dtype=bool)
    index = np.array([f.frame_index or 0 for f in frames], dtype=np.int64)
    gaps = np.abs(index[:, None] - index[None, :])  # (n, n)
    angles = np.full((n, n), np.nan)
    where = np.flatnonzero(posed)
    if len(where):
        unit = np.stack([dirs[k] for k in where])  # (m, 3) unit viewing directions
        dots = np.clip(unit @ unit.T, -1.0, 1.0)  # (m, m)
        block = np.degrees(np.arccos(dots))
        recheck = (np.abs(dots - np.cos(np.radians(params.min_angle_deg))) < RECHECK_DOT) | \
            (np.abs(dots) > 1.0 - RECHECK_DOT)
        np.fill_diagonal(recheck, False)  # a frame is never its own positive
        for a, b in zip(*np.nonzero(recheck)):
            block[a, b] = _angle_deg(unit[a], unit[b])
        angles[np.ix_(where, where)] = block
    both = posed[:, None] & posed[None, :]
    candidate = np.where(both, angles >= params.min_angle_deg, gaps >= fallback_gap(frames, captured))
    np.fill_diagonal(candidate, False)
    return candidate, angles, gaps, both


def mine_multiview(frames: list[SubjectFrame], params: PairsParams, *, captured: int | None = None) -> list[dict[str, Any]]:
    """Pairs (i, j) of one object's frames whose views differ by at least min_angle_deg.

    Without poses on both sides, the fallback is a frame-index gap of at least
    len(frames) // 8 (AnyDoor's rule), len(frames) being the object's whole capture:
    ``captured`` (the frames ingest read), not only those that passed the filters, which
    would shrink the gap. None: the frames given. Up to max_positives_per_frame positives per frame,
    drawn with a seed per frame so reruns give the same pairs.

    Every pair of frames is judged at once (one (n, n) matrix product of the viewing
    directions); the draw then runs per reference frame over its candidates in frame order.
    """
    candidate, angles, gaps, both = _multiview_candidates(frames, params, captured)
    vectors = [f.embedding.astype(np.float32) for f in frames]  # once per frame, not per pair
    pairs = []
    for i, ref in enumerate(frames):
        candidates = np.flatnonzero(candidate[i])  # j ascending, as the draw expects
        rng = np.random.default_rng(recipe_seed(ref.frame_id, 0, params.seed))
        chosen = sorted(rng.permutation(len(candidates))[: params.max_positives_per_frame].tolist())
        for c in chosen:
            j = int(candidates[c])
            pos = frames[j]
            pairs.append(_row(ref, kind="multiview", pair=f"{ref.frame_id}->{pos.frame_id}",
                              positive_frame_id=pos.frame_id,
                              angle_deg=float(angles[i, j]) if both[i, j] else None, frame_gap=int(gaps[i, j]),
                              area_ratio=pos.area_frac / ref.area_frac if ref.area_frac else 0.0,
                              r_ij=clip_cosine(np.dot(vectors[i], vectors[j]))))  # = cosine(ref.embedding, pos.embedding)
    return pairs


def mine_augmentations(frame: SubjectFrame, backgrounds: list[str], params: PairsParams) -> list[dict[str, Any]]:
    """augmentations_per_box recipes for a single-view subject.

    The positive shows the same segmented pixels (flipped or rescaled; a new background is
    masked out before embedding), so its appearance embedding is the reference's own and
    r_ij = cos(e_i, e_i); CLIP's small flip sensitivity is ignored on purpose.
    """
    others = [b for b in backgrounds if b != frame.image_path]
    rows = []
    for k in range(params.augmentations_per_box):
        recipe = make_recipe(frame.frame_id, k, frame.box, others, params)
        rows.append(_row(frame, kind="augmentation", pair=f"{frame.frame_id}->aug:{k}", area_ratio=recipe.scale ** 2,
                         r_ij=cosine(frame.embedding, frame.embedding), aug_crop=list(recipe.crop),
                         aug_scale=recipe.scale, aug_flip=recipe.flip, aug_background=recipe.background,
                         aug_seed=recipe.seed))
    return rows


def _row(ref: SubjectFrame, *, kind: str, pair: str, area_ratio: float, r_ij: float, **fields) -> dict[str, Any]:
    row = {"pair_id": pair, "source": ref.source, "subject_id": ref.subject_id, "frame_id": ref.frame_id,
           "kind": kind, "positive_frame_id": None, "angle_deg": None, "frame_gap": None,
           "area_ratio": area_ratio, "r_ij": r_ij, "aug_crop": None, "aug_scale": None, "aug_flip": None,
           "aug_background": None, "aug_seed": None}
    row.update(fields)
    return row


def mine_pairs(subjects: Iterable[list[SubjectFrame]], backgrounds: dict[str, list[str]], params: PairsParams,
               stats: "PairStats", unpaired: Callable[[SubjectFrame, str], None],
               split: SplitRule, captured: dict[str, int]) -> Iterator[dict[str, Any]]:
    """All pairs, subject by subject; ``stats`` is updated as they stream past, and
    ``unpaired(frame, detail)`` is called for every frame that gets no positive.

    ``backgrounds`` holds the background photos per split: a recipe draws from its frame's split.
    ``captured``: frames per MVImgNet object as ingest read them (the gap fallback's len(frames)).
    """
    for frames in subjects:
        if frames[0].source == ids.MVIMGNET:
            rows = mine_multiview(frames, params, captured=captured.get(frames[0].subject_id))
        else:
            rows = [row for frame in frames for row in mine_augmentations(
                frame, backgrounds[split.of(frame.source, frame.subject_id, frame.image_path)], params)]
        stats.add(frames, rows)
        paired = {r["frame_id"] for r in rows}
        for frame in frames:
            if frame.frame_id not in paired:
                unpaired(frame, _why_unpaired(frame, frames, params, captured.get(frame.subject_id)))
        yield from rows


def _why_unpaired(frame: SubjectFrame, frames: list[SubjectFrame], params: PairsParams, captured: int | None) -> str:
    if frame.source != ids.MVIMGNET:
        return f"pairs.augmentations_per_box is {params.augmentations_per_box}"
    dirs = [_view_dir(f.qvec) for f in frames]
    mine = _view_dir(frame.qvec)
    angles = [float(np.degrees(np.arccos(np.clip(np.dot(mine, d), -1.0, 1.0))))
              for f, d in zip(frames, dirs) if f is not frame and d is not None and mine is not None]
    widest = f"; widest angle to another posed view {max(angles):.1f} deg" if angles else ""
    return (f"none of the object's {len(frames) - 1} other accepted views is at >= pairs.min_angle_deg "
            f"{params.min_angle_deg} deg (or, without poses, a frame gap >= "
            f"{fallback_gap(frames, captured)}){widest}")


class PairStats:
    """Counts per source and kind, frames without a positive, angle histogram, r_ij range."""

    def __init__(self) -> None:
        self.pairs: Counter[str] = Counter()
        self.frames: Counter[str] = Counter()
        self.frames_without_positive: Counter[str] = Counter()
        self.angles = np.zeros(len(ANGLE_BINS) - 1, dtype=np.int64)
        self.r_min, self.r_max, self.r_sum = np.inf, -np.inf, 0.0

    def add(self, frames: list[SubjectFrame], rows: list[dict[str, Any]]) -> None:
        source = frames[0].source
        self.frames[source] += len(frames)
        with_positive = {r["frame_id"] for r in rows}
        self.frames_without_positive[source] += sum(f.frame_id not in with_positive for f in frames)
        for r in rows:
            self.pairs[f"{source}/{r['kind']}"] += 1
            self.r_min, self.r_max, self.r_sum = min(self.r_min, r["r_ij"]), max(self.r_max, r["r_ij"]), self.r_sum + r["r_ij"]
        angles = [r["angle_deg"] for r in rows if r["angle_deg"] is not None]
        if angles:
            self.angles += np.histogram(angles, bins=ANGLE_BINS)[0]

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.pairs.values())
        return {
            "pairs": dict(sorted(self.pairs.items())), "pairs_total": total,
            "frames": dict(sorted(self.frames.items())),
            "frames_without_positive": dict(sorted(self.frames_without_positive.items())),
            "angle_histogram": {f"{lo:03d}-{hi:03d}": int(c) for lo, hi, c in zip(ANGLE_BINS, ANGLE_BINS[1:], self.angles)},
            "r_ij": {"min": float(self.r_min), "max": float(self.r_max), "mean": self.r_sum / total} if total else {},
        }

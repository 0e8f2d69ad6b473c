"""Near-duplicate flags and hard negatives: same-subject pairs never flagged, threshold inclusive,
flagged subjects never each other's negatives."""

from __future__ import annotations

import numpy as np
import pytest

from flows.similarity.mining import (as_arrow, hard_negatives, near_duplicate_pairs_blockwise,
                                     near_duplicate_subject_pairs, neighbour_table, union_subject_pairs)
from flows.similarity.subjects import subject_mean_embeddings
from flows.similarity.topk import topk_cosine


def test_frame_table_flags_only_other_subjects_at_or_above_threshold():
    indices = np.array([[1, 2, 3], [0, 2, 3]])
    values = np.array([[0.99, 0.95, 0.5], [0.99, 0.949, 0.1]], np.float32)
    subject = np.array([7, 7, 8, 9])  # frames 0 and 1 are one subject
    table = neighbour_table(indices, values, subject=subject, threshold=0.95)
    assert table["i"].tolist() == [0, 0, 0, 1, 1, 1] and table["j"].tolist() == [1, 2, 3, 0, 2, 3]
    assert table["near_duplicate"].tolist() == [False, True, False, False, False, False]
    pairs = near_duplicate_subject_pairs(table, subject=subject)
    assert pairs["subject_a"].tolist() == [7] and pairs["subject_b"].tolist() == [8]
    np.testing.assert_allclose(pairs["r"], [0.95])


def test_subject_pairs_are_unordered_and_keep_the_max():
    table = {"i": np.array([0, 1, 2, 0]), "j": np.array([1, 0, 3, 1]), "r": np.array([0.96, 0.98, 0.97, 0.5], np.float32),
             "near_duplicate": np.array([True, True, True, False])}
    pairs = near_duplicate_subject_pairs(table, subject=None)
    assert list(zip(pairs["subject_a"].tolist(), pairs["subject_b"].tolist())) == [(0, 1), (2, 3)]
    np.testing.assert_allclose(pairs["r"], [0.98, 0.97])
    merged = union_subject_pairs(pairs, {"subject_a": np.array([2, 4]), "subject_b": np.array([3, 5]),
                                         "r": np.array([0.99, 0.9], np.float32)})
    assert list(zip(merged["subject_a"].tolist(), merged["subject_b"].tolist())) == [(0, 1), (2, 3), (4, 5)]
    np.testing.assert_allclose(merged["r"], [0.98, 0.99, 0.9])


def test_hard_negatives_skip_near_duplicates_in_both_directions():
    # subjects 0..3; 0's neighbours: 1 (0.97, flagged here), 2 (0.8), 3 (0.6); 2's: 3 (0.9, flagged from frames), 0, 1
    indices = np.array([[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 0, 1]])
    values = np.array([[0.97, 0.8, 0.6], [0.97, 0.7, 0.5], [0.9, 0.8, 0.7], [0.9, 0.6, 0.5]], np.float32)
    table = neighbour_table(indices, values, subject=None, threshold=0.95)
    from_frames = {"subject_a": np.array([2]), "subject_b": np.array([3]), "r": np.array([0.96], np.float32)}
    neg = hard_negatives(table, exclude=from_frames, h=2)
    got = {s: list(zip(neg["negative"][neg["subject"] == s].tolist(), neg["rank"][neg["subject"] == s].tolist()))
           for s in range(4)}
    assert got == {0: [(2, 0), (3, 1)], 1: [(2, 0), (3, 1)], 2: [(0, 0), (1, 1)], 3: [(0, 0), (1, 1)]}
    assert neg["rank"].dtype == np.int32 and as_arrow(neg).num_rows == 8


def test_end_to_end_on_planted_duplicate_subjects():
    """Frames -> subject means -> top-k -> flags and negatives; subject 'dup' re-crawls 'a'."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32)).astype(np.float32)
    centres[5] = centres[0]  # subject f duplicates subject a
    frame_subject = np.repeat(np.arange(6), 4)
    frames = centres[frame_subject] + 0.05 * rng.standard_normal((24, 32)).astype(np.float32)
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    idx, val = topk_cosine(frames, k=6, device="cpu")
    frame_table = neighbour_table(idx, val, subject=frame_subject, threshold=0.95)
    assert not frame_table["near_duplicate"][frame_subject[frame_table["i"]] == frame_subject[frame_table["j"]]].any()
    ids, means, _ = subject_mean_embeddings(frames, frame_subject)
    s_idx, s_val = topk_cosine(means, k=5, device="cpu")
    subject_table = neighbour_table(s_idx, s_val, subject=None, threshold=0.95)
    exclude = union_subject_pairs(near_duplicate_subject_pairs(frame_table, subject=frame_subject),
                                  near_duplicate_subject_pairs(subject_table, subject=None))
    assert list(zip(exclude["subject_a"].tolist(), exclude["subject_b"].tolist())) == [(0, 5)]
    neg = hard_negatives(subject_table, exclude=exclude, h=3)
    pairs = set(zip(neg["subject"].tolist(), neg["negative"].tolist()))
    assert (0, 5) not in pairs and (5, 0) not in pairs and len(pairs) == 18


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_blockwise_near_duplicate_pairs_equal_the_whole_table(block_rows):
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 60, (60, 9))
    val = np.sort(rng.uniform(0.8, 1.0, (60, 9)).astype(np.float32), axis=1)[:, ::-1]
    subject = rng.integers(0, 12, 60)
    whole = near_duplicate_subject_pairs(neighbour_table(idx, val, subject=subject, threshold=0.9), subject=subject)
    blocks = near_duplicate_pairs_blockwise(idx, val, subject=subject, threshold=0.9, block_rows=block_rows)
    assert len(whole["r"]) > 10
    for column in ("subject_a", "subject_b", "r"):
        np.testing.assert_array_equal(blocks[column], whole[column])
        assert blocks[column].dtype == whole[column].dtype
    empty = near_duplicate_pairs_blockwise(idx[:0, :0], val[:0, :0], subject=subject, threshold=0.9)
    assert all(len(c) == 0 for c in empty.values())

"""Per-subject mean embeddings: streamed in shards equals one shot, renormalised, first-seen order."""

from __future__ import annotations

import numpy as np
import pytest

from flows.similarity.subjects import SubjectMeanAccumulator, subject_codes, subject_mean_embeddings


def test_means_are_renormalised_averages_in_first_seen_order():
    e = np.array([[1, 0], [0, 1], [0, 1], [-1, 0]], np.float32)
    ids, means, counts = subject_mean_embeddings(e, ["b", "a", "b", "c"])
    assert ids.tolist() == ["b", "a", "c"] and counts.tolist() == [2, 1, 1]
    np.testing.assert_allclose(means, [[0.70710677, 0.70710677], [0, 1], [-1, 0]], atol=1e-6)
    assert means.dtype == np.float32


def test_shards_in_any_order_equal_one_shot():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((5000, 16)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    subjects = rng.integers(0, 700, 5000)
    ids, means, counts = subject_mean_embeddings(e, subjects)
    acc = SubjectMeanAccumulator(dim=16)
    for shard in np.array_split(np.arange(5000), 7):
        acc.add(e[shard], subjects[shard])
    acc.add(e[:0], subjects[:0])  # an empty shard changes nothing
    s_ids, s_means, s_counts = acc.result()
    np.testing.assert_array_equal(s_ids, ids)
    np.testing.assert_array_equal(s_counts, counts)
    np.testing.assert_allclose(s_means, means, atol=1e-6)
    for sid in (ids[0], ids[-1]):
        direct = e[subjects == sid].sum(axis=0)
        np.testing.assert_allclose(means[ids.tolist().index(sid)], direct / np.linalg.norm(direct), atol=1e-5)
    assert len(acc) == len(set(subjects.tolist())) and counts.sum() == 5000


def test_cancelling_frames_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="'x'"):
        subject_mean_embeddings(np.array([[1, 0], [-1, 0]], np.float32), ["x", "x"])
    acc = SubjectMeanAccumulator(dim=2)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        acc.add(np.zeros((3, 4), np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="subject_ids"):
        acc.add(np.zeros((3, 2), np.float32), ["a", "b"])


def test_subject_codes_map_frames_to_subject_rows():
    assert subject_codes(["s2", "s1", "s2"], ["s1", "s2"]).tolist() == [1, 0, 1]
    with pytest.raises(KeyError, match="s3"):
        subject_codes(["s3"], ["s1", "s2"])

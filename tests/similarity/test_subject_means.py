"""Per-subject mean embeddings: streamed in shards equals one shot, renormalised, first-seen order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flows.similarity import subjects as subjects_module
from flows.similarity.subjects import (
    SubjectMeanAccumulator,
    encode_subjects,
    subject_codes,
    subject_mean_embeddings,
    subject_means,
)


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


def test_encoded_subjects_are_in_first_seen_order_like_subject_codes():
    frame_subjects = ["s9", "s1", "s9", "s5", "s1", "s0"]
    for ids in (pa.array(frame_subjects), pa.chunked_array([frame_subjects[:2], frame_subjects[2:]]), frame_subjects):
        subjects, codes = encode_subjects(ids)
        assert subjects.to_pylist() == ["s9", "s1", "s5", "s0"]
        assert codes.dtype == np.int64 and codes.tolist() == subject_codes(frame_subjects, subjects.to_pylist()).tolist()
    with pytest.raises(ValueError, match="null"):
        encode_subjects(pa.array(["a", None]))


def test_encoded_subjects_are_put_in_first_seen_order_if_arrow_does_not(monkeypatch):
    import pyarrow.compute as pc

    unique = pc.unique
    monkeypatch.setattr(pc, "unique", lambda ids: unique(ids)[::-1])  # a hash table in another order
    subjects, codes = encode_subjects(pa.array(["b", "a", "b", "c", "a"]))
    assert subjects.to_pylist() == ["b", "a", "c"] and codes.tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_subject_means_from_codes_equal_the_accumulator(monkeypatch, dtype):
    """Float32 sums in blocks of 7 frames (monkeypatched), frames of a subject spread over
    blocks and out of order: the float64 means of the accumulator's first version, within float32."""
    monkeypatch.setattr(subjects_module, "SUM_BLOCK_ROWS", 7)
    rng = np.random.default_rng(1)
    e = rng.standard_normal((500, 24)).astype(np.float32)
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(dtype)
    frame_subjects = [f"s{s}" for s in rng.integers(0, 60, 500)]
    ids, means, counts = subject_mean_embeddings(e, frame_subjects)
    subjects, codes = encode_subjects(pa.array(frame_subjects))
    s_means, s_counts = subject_means(e, codes, subjects)
    assert subjects.to_pylist() == ids.tolist() and s_counts.tolist() == counts.tolist()
    assert s_means.dtype == np.float32
    reference = np.zeros((len(ids), 24))
    np.add.at(reference, codes, e.astype(np.float64))
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    np.testing.assert_allclose(s_means, reference, atol=1e-6)
    np.testing.assert_allclose(means, reference, atol=1e-6)


def test_subject_means_name_a_subject_whose_frames_cancel():
    subjects, codes = encode_subjects(pa.array(["ok", "x", "x"]))
    with pytest.raises(ValueError, match="'x'"):
        subject_means(np.array([[1, 0], [0, 1], [0, -1]], np.float16), codes, subjects)

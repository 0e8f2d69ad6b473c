"""flows.similarity.above: the threshold search that completes cut top-k lists."""

import numpy as np

from flows.similarity import above


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    x[n // 2:] = x[: n - n // 2] + 0.05 * x[n // 2:]  # pairs of look-alikes
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_pairs_above_equal_brute_force_without_self_or_same_subject(monkeypatch):
    monkeypatch.setattr(above, "QUERY_ROWS", 7)  # several query blocks
    monkeypatch.setattr(above, "SCORE_BLOCK_BYTES", {"cpu": 7 * 4 * 13})  # and column blocks of 13
    x = unit_rows(60, 16, seed=1)
    rows = np.array([0, 3, 31, 45, 59])
    gram = x.astype(np.float32) @ x.astype(np.float32).T
    threshold = 0.9
    expected = {(int(i), int(j)) for i in rows for j in np.flatnonzero(gram[i] >= threshold) if i != j}
    got = above.pairs_above(x, rows, threshold)
    assert set(zip(got["i"].tolist(), got["j"].tolist())) == expected and len(got["r"]) == len(expected)
    np.testing.assert_allclose(got["r"], gram[got["i"], got["j"]], atol=1e-5)
    subject = np.arange(60) % 30  # row k and row k + 30 are one subject
    same = above.pairs_above(x, rows, threshold, subject=subject)
    assert all(subject[i] != subject[j] for i, j in zip(same["i"], same["j"]))
    assert len(same["i"]) == sum(subject[i] != subject[j] for i, j in expected)


def test_no_deep_rows_cost_nothing():
    got = above.pairs_above(np.zeros((5, 4), np.float16), np.zeros(0, np.int64), 0.9, device="not a device")
    assert all(len(v) == 0 for v in got.values())
    values = np.array([[0.99, 0.97], [0.99, 0.5]], np.float32)
    assert above.deep_rows(values, 0.95, candidates=9).tolist() == [0]
    assert above.deep_rows(values, 0.95, candidates=2).tolist() == []  # the lists hold every candidate

"""Every neighbour at or above a threshold, for the rows whose top-k list may have cut some off.

Near-duplicates are pairs of different subjects with r >= ``similarity.near_duplicate_r``. The
top-k search lists each row's k best, so a row in a cluster of more than k look-alikes (many
copies of one stock photo, a product shot from the same angle many times) has near-duplicates
past its k-th neighbour. Such a row shows itself: its deepest listed r is still at or above the
threshold (:func:`deep_rows`). For those rows only, :func:`pairs_above` scores the row against
all N and keeps every r at or above the threshold, so the near-duplicate pairs are exact
whatever the cluster sizes. Its cost is (deep rows) x N x d, nothing when no list is cut.
"""

from __future__ import annotations

import logging

import numpy as np

SCORE_BLOCK_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}  # one (query rows, columns) float32 score block
QUERY_ROWS = 1024  # query rows scored at once (fewer when the columns would exceed the block)
WARN_MULTIPLY_ADDS = 10**13  # above this the threshold search is logged with its cost (minutes on a GPU)

log = logging.getLogger(__name__)


def deep_rows(values: np.ndarray, threshold: float, *, candidates: int) -> np.ndarray:
    """Rows of a top-k answer whose deepest value is >= ``threshold``: their lists may be cut.

    values: (R, depth) float32, each row descending (``topk_cosine``). candidates: how many
    neighbours a row has at all (N - 1); a list that holds them all is never cut.
    """
    if values.shape[1] == 0 or values.shape[1] >= candidates:
        return np.zeros(0, np.int64)
    return np.flatnonzero(values[:, -1] >= threshold).astype(np.int64)


def pairs_above(x: np.ndarray, rows: np.ndarray, threshold: float, *, device: str = "cpu",
                subject: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """(i, j, r) for every i in ``rows`` and j != i with x_i . x_j >= ``threshold``, exactly.

    x: (N, d) L2-normalised rows (float16 or float32), scored in float32 (torch, on ``device``).
    subject: (N,) subject codes; pairs within one subject (an object's own views) are not kept.
    Returns columns i, j (int64) and r (float32), one row per pair found (in block order).
    Memory is the pairs found: the sum over clusters of look-alikes of (rows in it) x (its size).
    """
    empty = {"i": np.zeros(0, np.int64), "j": np.zeros(0, np.int64), "r": np.zeros(0, np.float32)}
    if len(rows) == 0:
        return empty
    import torch

    n, d = x.shape
    if len(rows) * n * d > WARN_MULTIPLY_ADDS:
        log.warning("similarity: %d rows have near-duplicates past their listed neighbours; scoring them against "
                    "all %d rows is %.1f TFLOP (similarity.near_duplicate_r may be too low for these embeddings)",
                    len(rows), n, 2 * len(rows) * n * d / 1e12)
    dev = torch.device(device)
    base = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
    codes = None if subject is None else torch.from_numpy(np.asarray(subject, np.int64)).to(dev)
    columns = max(1, min(n, SCORE_BLOCK_BYTES[dev.type] // (4 * min(QUERY_ROWS, max(1, len(rows))))))
    found: dict[str, list[np.ndarray]] = {"i": [], "j": [], "r": []}
    for q0 in range(0, len(rows), QUERY_ROWS):
        query_rows = torch.from_numpy(rows[q0:q0 + QUERY_ROWS]).to(dev)
        query = base[query_rows].float()  # (b, d)
        for c0 in range(0, n, columns):
            scores = query @ base[c0:c0 + columns].float().T  # (b, c)
            q, c = (scores >= threshold).nonzero(as_tuple=True)
            i, j = query_rows[q], c + c0
            keep = i != j if codes is None else codes[i] != codes[j]
            found["i"].append(i[keep].cpu().numpy())
            found["j"].append(j[keep].cpu().numpy())
            found["r"].append(scores[q, c][keep].cpu().numpy())
    return {name: np.concatenate(found[name] or [empty[name]]).astype(empty[name].dtype) for name in empty}


__all__ = ["deep_rows", "pairs_above"]

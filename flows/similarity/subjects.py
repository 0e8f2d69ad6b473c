"""Mean appearance embedding per subject, renormalised, from frame embeddings in any order.

Frames arrive in shards (one Parquet file at a time), so the means are accumulated: a
running float64 sum and a count per subject, O(S*d) memory for S subjects, whatever the
number of frames. Subjects keep the order in which they were first seen.
"""

from __future__ import annotations

import numpy as np


class SubjectMeanAccumulator:
    """Running per-subject sums of L2-normalised frame embeddings.

    dim: embedding width d. Feed (embeddings (n, d), subject_ids (n,)) batches with ``add``;
    ``result`` gives the renormalised means.
    """

    def __init__(self, *, dim: int):
        self.dim = dim
        self._row_of: dict = {}  # subject id -> row in _sums
        self._ids: list = []  # subject ids in first-seen order
        self._sums = np.zeros((0, dim), np.float64)  # (capacity, d); rows past len(self._ids) unused
        self._counts = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, embeddings: np.ndarray, subject_ids) -> None:
        embeddings = np.asarray(embeddings)
        subject_ids = np.asarray(subject_ids)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must be (n, {self.dim}), got {embeddings.shape}")
        if subject_ids.shape != (embeddings.shape[0],):
            raise ValueError(f"subject_ids must be ({embeddings.shape[0]},), got {subject_ids.shape}")
        if not len(subject_ids):
            return
        unique, first, inverse = np.unique(subject_ids, return_index=True, return_inverse=True)  # (u,), (u,), (n,)
        unique_rows = np.empty(len(unique), np.int64)
        for u in np.argsort(first):  # new subjects get rows in the order they first appear
            unique_rows[u] = self._row(unique[u].item())
        rows = unique_rows[inverse]  # (n,) global rows
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        sums = np.add.reduceat(embeddings[order].astype(np.float64), starts, axis=0)  # (u, d)
        self._sums[sorted_rows[starts]] += sums
        self._counts[sorted_rows[starts]] += np.diff(np.r_[starts, len(order)])

    def _row(self, subject_id) -> int:
        row = self._row_of.get(subject_id)
        if row is None:
            row = self._row_of[subject_id] = len(self._ids)
            self._ids.append(subject_id)
            if row == len(self._counts):  # grow geometrically
                grow = max(1024, row)
                self._sums = np.concatenate([self._sums, np.zeros((grow, self.dim), np.float64)])
                self._counts = np.concatenate([self._counts, np.zeros(grow, np.int64)])
        return row

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(subject_ids (S,), means (S, d) float32 L2-normalised, frame counts (S,) int64).

        A subject whose frames cancel out (mean norm below 1e-6) has no direction: ValueError.
        """
        s = len(self._ids)
        sums = self._sums[:s]
        norms = np.linalg.norm(sums, axis=1)
        if s and (norms < 1e-6 * self._counts[:s]).any():
            bad = int(np.flatnonzero(norms < 1e-6 * self._counts[:s])[0])
            raise ValueError(f"subject {self._ids[bad]!r}: the mean of its frame embeddings is ~0")
        means = (sums / np.maximum(norms, 1e-300)[:, None]).astype(np.float32)
        return np.array(self._ids), means, self._counts[:s].copy()


def subject_mean_embeddings(embeddings: np.ndarray, subject_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-shot ``SubjectMeanAccumulator``: (subject_ids, means (S, d), counts) in first-seen order."""
    embeddings = np.asarray(embeddings)
    acc = SubjectMeanAccumulator(dim=embeddings.shape[1])
    acc.add(embeddings, subject_ids)
    return acc.result()


def subject_codes(frame_subject_ids, subject_ids) -> np.ndarray:
    """(n,) int64 row in ``subject_ids`` of each frame's subject; KeyError names an unknown one."""
    row_of = {s: r for r, s in enumerate(np.asarray(subject_ids).tolist())}
    try:
        return np.array([row_of[s] for s in np.asarray(frame_subject_ids).tolist()], np.int64)
    except KeyError as err:
        raise KeyError(f"frame subject {err.args[0]!r} is not among the subjects") from None

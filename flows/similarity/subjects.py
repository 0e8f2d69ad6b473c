"""Mean appearance embedding per subject, renormalised, from frame embeddings in any order.

Subjects keep the order in which they were first seen. Two ways in:

- ``encode_subjects`` + ``subject_means`` (the stage): the frames' subject ids (an Arrow
  column) become integer codes in first-seen order, so the subject count S is known before
  any sum; the (S, d) float32 sums are then preallocated and filled in row blocks of the
  (N, d) embeddings, with O(block * d) temporaries and no per-frame Python objects. The sums
  are renormalised in place and become the means: O(S * d) memory besides the input.
- ``SubjectMeanAccumulator`` for frames arriving in shards with unknown subjects: running
  float32 sums and counts per subject, growing as new subjects appear.

Sums are float32: a subject's frames are at most a few thousand float16 unit vectors, so
their float32 sum is accurate to ~1e-7 * frames relative, far inside float16's 1e-3.
"""

from __future__ import annotations

import numpy as np

SUM_BLOCK_ROWS = 8192  # frames summed at once: bounds the temporaries to ~8192 x d float32


class SubjectMeanAccumulator:
    """Running per-subject sums of L2-normalised frame embeddings.

    dim: embedding width d. capacity: subjects to preallocate for (grows past it).
    Feed (embeddings (n, d), subject_ids (n,)) batches with ``add``; ``result`` gives the
    renormalised means.
    """

    def __init__(self, *, dim: int, capacity: int = 0):
        self.dim = dim
        self._row_of: dict = {}  # subject id -> row in _sums
        self._ids: list = []  # subject ids in first-seen order
        self._sums = np.zeros((capacity, dim), np.float32)  # (capacity, d); rows past len(self._ids) unused
        self._counts = np.zeros(capacity, np.int64)

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
        rows = unique_rows[inverse.reshape(-1)]  # (n,) global rows
        add_rows(self._sums, embeddings, rows)
        self._counts += np.bincount(rows, minlength=len(self._counts))

    def _row(self, subject_id) -> int:
        row = self._row_of.get(subject_id)
        if row is None:
            row = self._row_of[subject_id] = len(self._ids)
            self._ids.append(subject_id)
            if row == len(self._counts):  # grow geometrically
                grow = max(1024, row)
                self._sums = np.concatenate([self._sums, np.zeros((grow, self.dim), np.float32)])
                self._counts = np.concatenate([self._counts, np.zeros(grow, np.int64)])
        return row

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(subject_ids (S,), means (S, d) float32 L2-normalised, frame counts (S,) int64).

        A subject whose frames cancel out (mean norm below 1e-6) has no direction: ValueError.
        """
        s = len(self._ids)
        means = self._sums[:s].copy()
        normalise_rows(means, self._counts[:s], self._ids)
        return np.array(self._ids), means, self._counts[:s].copy()


def subject_mean_embeddings(embeddings: np.ndarray, subject_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-shot ``SubjectMeanAccumulator``: (subject_ids, means (S, d), counts) in first-seen order."""
    embeddings = np.asarray(embeddings)
    acc = SubjectMeanAccumulator(dim=embeddings.shape[1])
    acc.add(embeddings, subject_ids)
    return acc.result()


def encode_subjects(frame_subject_ids) -> tuple:
    """(subject_ids, codes): the distinct subjects in first-seen order and each frame's row among them.

    frame_subject_ids: (N,) a pyarrow Array or ChunkedArray (e.g. a Parquet column), or
    anything ``pa.array`` takes. Returns (a pyarrow Array of S ids, codes (N,) int64). Hash
    based (``pyarrow.compute.unique`` / ``index_in``): no Python object per frame.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = frame_subject_ids if isinstance(frame_subject_ids, (pa.Array, pa.ChunkedArray)) else pa.array(
        np.asarray(frame_subject_ids).tolist())
    if ids.null_count:
        raise ValueError("a frame has no subject id (null)")
    subjects = pc.unique(ids)
    if isinstance(subjects, pa.ChunkedArray):
        subjects = subjects.combine_chunks()
    codes = pc.index_in(ids, value_set=subjects).to_numpy().astype(np.int64)  # (N,)
    if len(codes) and not _first_seen(codes):
        # Arrow's hash kernels keep the order of first appearance, but do not document it: if that
        # ever changes, put the subjects in first-seen order here
        first = np.unique(codes, return_index=True)[1]  # (S,) first frame of each code
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        subjects, codes = subjects.take(pa.array(order)), rank[codes]
    return subjects, codes


def _first_seen(codes: np.ndarray) -> bool:
    """Whether each code's first frame comes after the first frame of every smaller code."""
    running = np.maximum.accumulate(codes)
    return codes[0] == 0 and bool((codes[1:] <= running[:-1] + 1).all())


def subject_means(embeddings: np.ndarray, codes: np.ndarray, subject_ids) -> tuple[np.ndarray, np.ndarray]:
    """(means (S, d) float32 L2-normalised, frame counts (S,) int64) of the subjects' frames.

    embeddings: (N, d) float16 or float32, read in row blocks (never copied whole).
    codes: (N,) int64 row of each frame's subject (``encode_subjects``).
    subject_ids: the S ids (any sequence or pyarrow Array); S = len(subject_ids), and the id
        names a subject whose frames cancel out (ValueError).
    """
    embeddings = np.asarray(embeddings)
    n_subjects = len(subject_ids)
    if embeddings.ndim != 2 or codes.shape != (embeddings.shape[0],):
        raise ValueError(f"embeddings (n, d) and codes (n,) expected, got {embeddings.shape} and {codes.shape}")
    sums = np.zeros((n_subjects, embeddings.shape[1]), np.float32)
    add_rows(sums, embeddings, codes)
    counts = np.bincount(codes, minlength=n_subjects).astype(np.int64)
    normalise_rows(sums, counts, subject_ids)
    return sums, counts


def add_rows(sums: np.ndarray, embeddings: np.ndarray, rows: np.ndarray) -> None:
    """sums[rows[i]] += embeddings[i] for every i, in float32, SUM_BLOCK_ROWS frames at a time."""
    for r0 in range(0, len(rows), SUM_BLOCK_ROWS):
        block_rows = rows[r0:r0 + SUM_BLOCK_ROWS]
        block = embeddings[r0:r0 + SUM_BLOCK_ROWS]
        if (block_rows[1:] < block_rows[:-1]).any():  # group each subject's frames together
            order = np.argsort(block_rows, kind="stable")
            block_rows, block = block_rows[order], block[order]
        starts = np.flatnonzero(np.r_[True, block_rows[1:] != block_rows[:-1]])
        sums[block_rows[starts]] += np.add.reduceat(block, starts, axis=0, dtype=np.float32)  # (u, d)


def normalise_rows(sums: np.ndarray, counts: np.ndarray, subject_ids) -> None:
    """Divide each row of sums (S, d) float32 by its norm, in place, in row blocks.

    A row whose norm is below 1e-6 * its count (frames that cancel out) raises ValueError
    naming subject_ids[row].
    """
    for r0 in range(0, len(sums), SUM_BLOCK_ROWS):
        block = sums[r0:r0 + SUM_BLOCK_ROWS]
        norms = np.linalg.norm(block.astype(np.float64), axis=1)
        bad = norms < 1e-6 * counts[r0:r0 + SUM_BLOCK_ROWS]
        if bad.any():
            row = r0 + int(np.flatnonzero(bad)[0])
            raise ValueError(f"subject {_python_value(subject_ids[row])!r}: the mean of its frame embeddings is ~0")
        np.divide(block, np.maximum(norms, 1e-300)[:, None], out=block, casting="unsafe")


def _python_value(value):
    if hasattr(value, "as_py"):  # a pyarrow scalar
        return value.as_py()
    return value.item() if isinstance(value, np.generic) else value


def subject_codes(frame_subject_ids, subject_ids) -> np.ndarray:
    """(n,) int64 row in ``subject_ids`` of each frame's subject; KeyError names an unknown one."""
    row_of = {s: r for r, s in enumerate(np.asarray(subject_ids).tolist())}
    try:
        return np.array([row_of[s] for s in np.asarray(frame_subject_ids).tolist()], np.int64)
    except KeyError as err:
        raise KeyError(f"frame subject {err.args[0]!r} is not among the subjects") from None

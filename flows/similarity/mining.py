"""From top-k neighbours to the tables training needs: r_ij, near-duplicates, hard negatives.

Rows are integer positions (frames of the embedding table, or subjects of the subject-mean
table); ``subject`` maps each row to its subject code (``subjects.subject_codes``), and a
subject-level table uses ``subject=None`` (each row is its own subject). Every function
returns plain columns (dict of numpy arrays; ``as_arrow`` makes a pyarrow Table) so the
Parquet schemas stay in flows/schemas.py.

Near-duplicate: two rows of *different* subjects with r >= threshold (the same object
crawled twice, a stock photo reused). Frames of one subject are alike by design (they are
each other's positives), so they are never flagged. Two subjects flagged at frame or subject
level are never each other's negatives.
"""

from __future__ import annotations

import numpy as np


def neighbour_table(indices: np.ndarray, values: np.ndarray, *, subject: np.ndarray | None, threshold: float,
                    row_offset: int = 0) -> dict[str, np.ndarray]:
    """The sparse top-k table: one row per (i, j) neighbour pair.

    indices, values: (R, k) from ``topk_cosine``; row q is query row ``row_offset + q``.
    subject: (N,) subject code of every row, or None when rows are subjects.
    Columns: i, j (int64 rows), r (float32 cosine), near_duplicate (bool: other subject, r >= threshold).
    """
    rows, k = indices.shape
    pairs = {"i": np.repeat(np.arange(row_offset, row_offset + rows, dtype=np.int64), k),
             "j": indices.reshape(-1).astype(np.int64), "r": values.reshape(-1).astype(np.float32)}
    return flag_pairs(pairs, subject=subject, threshold=threshold)


def flag_pairs(pairs: dict[str, np.ndarray], *, subject: np.ndarray | None, threshold: float) -> dict[str, np.ndarray]:
    """(i, j, r) pairs (a top-k answer's, or flows.similarity.above.pairs_above's) as a neighbour table:
    ``near_duplicate`` marks other subjects at r >= threshold."""
    i, j, r = pairs["i"], pairs["j"], pairs["r"]
    other = i != j if subject is None else subject[i] != subject[j]
    return {"i": i, "j": j, "r": r, "near_duplicate": other & (r >= threshold)}


def near_duplicate_subject_pairs(table: dict[str, np.ndarray], *, subject: np.ndarray | None) -> dict[str, np.ndarray]:
    """Flagged rows of a neighbour table as unordered subject pairs (a < b), each once with its max r."""
    flagged = table["near_duplicate"]
    i, j, r = table["i"][flagged], table["j"][flagged], table["r"][flagged]
    si, sj = (i, j) if subject is None else (subject[i], subject[j])
    return _max_per_pair(np.minimum(si, sj), np.maximum(si, sj), r)


def near_duplicate_pairs_blockwise(indices: np.ndarray, values: np.ndarray, *, subject: np.ndarray | None,
                                   threshold: float, block_rows: int = 65536) -> dict[str, np.ndarray]:
    """``near_duplicate_subject_pairs(neighbour_table(indices, values, ...))`` without the table.

    The table is built block_rows query rows at a time and only its flagged pairs are kept,
    so memory is O(block_rows * k) besides the pairs (the frame search's whole table is
    N * depth rows: ~15 GB at N = 9M, depth 80). Same pairs, same order, same r.
    """
    parts = [near_duplicate_subject_pairs(neighbour_table(indices[r0:r0 + block_rows], values[r0:r0 + block_rows],
                                                          subject=subject, threshold=threshold, row_offset=r0),
                                          subject=subject)
             for r0 in range(0, max(len(indices), 1), block_rows)]
    return union_subject_pairs(*parts)


def union_subject_pairs(*pair_tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Several subject-pair tables (frame level, subject level) as one, each pair once with its max r."""
    return _max_per_pair(*(np.concatenate([t[c] for t in pair_tables]) for c in ("subject_a", "subject_b", "r")))


def hard_negatives(subject_table: dict[str, np.ndarray], *, exclude: dict[str, np.ndarray], h: int) -> dict[str, np.ndarray]:
    """Per subject, its h most similar other subjects that are not near-duplicates of it.

    subject_table: ``neighbour_table`` over subject means (subject=None); k should exceed h by
        the near-duplicates expected, since a subject with fewer clean neighbours gets fewer.
    exclude: subject pairs that must never be negatives (``near_duplicate_subject_pairs``).
    Columns: subject, negative (int64 subject codes), rank (int32, 0 = hardest), r (float32).
    """
    i, j, r = subject_table["i"], subject_table["j"], subject_table["r"]
    keep = (i != j) & ~subject_table["near_duplicate"]
    keep &= ~np.isin(_pair_key(np.minimum(i, j), np.maximum(i, j)),
                     _pair_key(exclude["subject_a"], exclude["subject_b"]))
    i, j, r = i[keep], j[keep], r[keep]
    order = np.lexsort((j, -r, i))  # by subject, then hardest first, ties by lower code
    i, j, r = i[order], j[order], r[order]
    first = np.flatnonzero(np.r_[True, i[1:] != i[:-1]]) if len(i) else np.zeros(0, np.int64)
    rank = np.arange(len(i)) - np.repeat(first, np.diff(np.r_[first, len(i)]))
    top = rank < h
    return {"subject": i[top], "negative": j[top], "rank": rank[top].astype(np.int32), "r": r[top]}


def as_arrow(columns: dict[str, np.ndarray]):
    """A pyarrow Table of these columns (the caller casts to the schema in flows/schemas.py)."""
    import pyarrow as pa

    return pa.table(columns)


def _pair_key(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) << 32) | b.astype(np.int64)  # codes < 2**31: one int64 per pair


def _max_per_pair(a: np.ndarray, b: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    order = np.lexsort((-r, b, a))  # per pair, the largest r first
    a, b, r = a[order], b[order], r[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])] if len(a) else np.zeros(0, bool)
    return {"subject_a": a[first].astype(np.int64), "subject_b": b[first].astype(np.int64),
            "r": r[first].astype(np.float32)}

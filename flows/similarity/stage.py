"""The ``similarity`` stage as plain functions: top-k tables over frames and subjects.

Memory: the (N, d) float16 embeddings (the index itself), O(N*k) results and one block
of scores; never N x N.

Near-duplicate subjects are found at two levels: subject means (an object crawled twice) and
frames. An object's own views are its frames' nearest neighbours (MVImgNet has ~30 per
object), so the frame search goes k + (largest subject's frames - 1) deep, capped by
``near_duplicate_extra_k``: another subject's frame then cannot hide behind them. The
neighbours table keeps the first k of each row (the plain top-k); stats say whether the
cap made the frame level incomplete.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.config.params import SimilarityParams
from flows.schemas import HARD_NEGATIVES, NEAR_DUPLICATES, NEIGHBOURS
from flows.similarity.mining import (
    hard_negatives,
    near_duplicate_subject_pairs,
    neighbour_table,
    union_subject_pairs,
)
from flows.similarity.subjects import subject_codes, subject_mean_embeddings
from flows.similarity.topk import topk_cosine
from flows.tables import TableWriter, fixed_size_list_to_numpy, write_json_atomic


def read_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame_ids (N,), subject_ids (N,), embeddings (N, d) float16) in table order."""
    table = pq.read_table(path, columns=["frame_id", "subject_id", "embedding"])
    vectors = fixed_size_list_to_numpy(table.column("embedding"))  # (N, d)
    return (np.asarray(table.column("frame_id").to_pylist(), dtype=str),
            np.asarray(table.column("subject_id").to_pylist(), dtype=str), vectors)


def _write_neighbours(writer: TableWriter, level: str, names: np.ndarray, table: dict, k: int) -> None:
    n = len(table["i"])
    writer.write_batch(pa.table({
        "level": pa.array([level] * n, pa.string()),
        "i": pa.array(names[table["i"]].tolist(), pa.string()),
        "j": pa.array(names[table["j"]].tolist(), pa.string()),
        "rank": pa.array((np.arange(n) % k if k else np.zeros(n)).astype(np.int16)),
        "r": pa.array(table["r"], pa.float32()),
        "near_duplicate": pa.array(table["near_duplicate"]),
    }))


def compute_similarity(embeddings: Path, out_dir: Path, params: SimilarityParams) -> dict:
    """Write neighbours.parquet, near_duplicates.parquet, hard_negatives.parquet and stats.json."""
    frame_ids, frame_subjects, vectors = read_embeddings(embeddings)
    start = time.perf_counter()
    subjects, means, counts = subject_mean_embeddings(vectors.astype(np.float32), frame_subjects)
    codes = subject_codes(frame_subjects, subjects)
    own_views = int(counts.max()) - 1 if len(counts) else 0  # same-subject rows that can precede others
    extra = min(own_views, params.near_duplicate_extra_k)
    f_idx, f_val = topk_cosine(vectors, k=params.k + extra, block_rows=params.block_rows, device=params.device)
    s_idx, s_val = topk_cosine(means, k=params.k, block_rows=params.block_rows, device=params.device)
    deep_table = neighbour_table(f_idx, f_val, subject=codes, threshold=params.near_duplicate_r)
    kept = min(params.k, f_idx.shape[1])  # columns are sorted: the first k are the plain top-k
    frames_table = neighbour_table(f_idx[:, :kept], f_val[:, :kept], subject=codes, threshold=params.near_duplicate_r)
    subject_table = neighbour_table(s_idx, s_val, subject=None, threshold=params.near_duplicate_r)
    duplicates = union_subject_pairs(near_duplicate_subject_pairs(deep_table, subject=codes),
                                     near_duplicate_subject_pairs(subject_table, subject=None))
    negatives = hard_negatives(subject_table, exclude=duplicates, h=params.hard_negatives)
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    with TableWriter(out_dir / "neighbours.parquet", NEIGHBOURS) as writer:
        _write_neighbours(writer, "frame", frame_ids, frames_table, kept)
        _write_neighbours(writer, "subject", subjects, subject_table, s_idx.shape[1])
    with TableWriter(out_dir / "near_duplicates.parquet", NEAR_DUPLICATES) as writer:
        a, b = subjects[duplicates["subject_a"]], subjects[duplicates["subject_b"]]  # codes: first-seen order
        swap = a > b  # the smaller id first, as documented
        writer.write_batch(pa.table({"subject_a": np.where(swap, b, a).tolist(),
                                     "subject_b": np.where(swap, a, b).tolist(), "r": duplicates["r"]}))
    with TableWriter(out_dir / "hard_negatives.parquet", HARD_NEGATIVES) as writer:
        writer.write_batch(pa.table({"subject_id": subjects[negatives["subject"]].tolist(),
                                     "negative_subject_id": subjects[negatives["negative"]].tolist(),
                                     "rank": negatives["rank"].astype(np.int16), "r": negatives["r"]}))
    stats = {"frames": len(frame_ids), "subjects": len(subjects), "k": params.k,
             "frame_neighbour_rows": len(frames_table["i"]), "subject_neighbour_rows": len(subject_table["i"]),
             "near_duplicate_subject_pairs": len(duplicates["r"]), "hard_negative_rows": len(negatives["r"]),
             "frame_search_k": int(f_idx.shape[1]), "frame_near_duplicates_complete": extra == own_views,
             "seconds": round(seconds, 3), "device": params.device}
    write_json_atomic(out_dir / "stats.json", stats)
    return stats

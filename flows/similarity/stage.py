"""The ``similarity`` stage as plain functions: top-k tables over frames and subjects.

Memory: the (N, d) float16 embeddings (the index itself), O(N*k) results and one block
of scores; never N x N. Ids stay Arrow arrays; the output tables are built and written
WRITE_ROWS rows at a time, and the frame search's deeper columns (near-duplicates only)
are read blockwise and freed before writing.

Near-duplicate subjects are found at two levels: subject means (an object crawled twice) and
frames. An object's own views are its frames' nearest neighbours (MVImgNet has ~30 per
object), so the frame search goes k + (largest subject's frames - 1) deep, capped by
``near_duplicate_extra_k``: another subject's frame then cannot hide behind them. The
neighbours table keeps the first k of each row (the plain top-k). A row whose searched list
still ends at or above ``near_duplicate_r`` (a cluster of look-alikes larger than the list, or
own views past the cap) is scored against every row by threshold (flows.similarity.above), so
the near-duplicate pairs are complete at both levels; stats count those rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.config.params import SimilarityParams
from flows.schemas import HARD_NEGATIVES, NEAR_DUPLICATES, NEIGHBOURS
from flows.similarity.above import deep_rows, pairs_above
from flows.similarity.mining import (
    flag_pairs,
    hard_negatives,
    near_duplicate_pairs_blockwise,
    near_duplicate_subject_pairs,
    neighbour_table,
    union_subject_pairs,
)
from flows.similarity.subjects import encode_subjects, subject_means
from flows.progress import Progress
from flows.similarity.topk import resolve_device, topk_cosine
from flows.tables import TableWriter, fixed_size_list_to_numpy, write_stats

READ_BATCH_ROWS = 65536  # embedding rows decoded at once while filling the (N, d) array
WRITE_ROWS = 1 << 20  # output rows per write: pyarrow's default row group size (ParquetWriter.write_table)


def read_embeddings(path: Path) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(frame_ids (N,), subject_ids (N,), embeddings (N, d) float16) in table order.

    The ids stay Arrow (large_string) arrays: compact, and no Python object per frame. The
    embeddings fill one preallocated array batch by batch, so the temporaries are one decoded
    batch and one row group's compressed column (the whole column as Arrow plus its numpy copy
    would double the peak). One reader per row group: a single iter_batches over the file kept
    every compressed page it had read until the end (pyarrow 26: +330 MB for a 290 MB file,
    the pattern of apache/arrow#39808), per row group its memory stays flat.
    """
    ids = pq.read_table(path, columns=["frame_id", "subject_id"])
    frame_ids, subject_ids = (ids.column(name).cast(pa.large_string()).combine_chunks()
                              for name in ("frame_id", "subject_id"))
    del ids
    parquet = pq.ParquetFile(path)
    column_type = parquet.schema_arrow.field("embedding").type  # fixed_size_list<float16>[d]
    vectors = np.empty((parquet.metadata.num_rows, column_type.list_size), column_type.value_type.to_pandas_dtype())
    row = 0
    for group in range(parquet.num_row_groups):
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=["embedding"]):
            block = fixed_size_list_to_numpy(batch.column(0))  # (b, d)
            vectors[row:row + len(block)] = block
            row += len(block)
    if row != len(vectors) or len(frame_ids) != len(vectors):
        raise ValueError(f"{path}: read {row} embeddings and {len(frame_ids)} ids for {len(vectors)} rows")
    return frame_ids, subject_ids, vectors


def _write_blocks(writer: TableWriter, rows: int, block: Callable[[int, int], pa.Table]) -> None:
    """Write rows [0, rows) as block(t0, t1) tables of WRITE_ROWS rows each (the last one shorter).

    WRITE_ROWS is pyarrow's default row group size, so the file has the row groups, and the
    bytes, of one write of the whole table, while only one block of ids is ever materialised.
    """
    for t0 in range(0, rows, WRITE_ROWS):
        writer.write_batch(block(t0, min(t0 + WRITE_ROWS, rows)))


def _write_neighbours(writer: TableWriter, level: str, names: pa.Array, indices: np.ndarray, values: np.ndarray,
                      *, subject: np.ndarray | None, threshold: float) -> None:
    """The rows of ``neighbour_table(indices, values, ...)`` with ids for rows, in row order, blockwise."""
    n_rows, k = indices.shape

    def block(t0: int, t1: int) -> pa.Table:  # flat rows t0..t1: query rows q0..q1, cut at both ends
        q0, q1 = t0 // k, -(-t1 // k)
        table = neighbour_table(indices[q0:q1], values[q0:q1], subject=subject, threshold=threshold, row_offset=q0)
        cut = slice(t0 - q0 * k, t1 - q0 * k)
        return pa.table({
            "level": pa.array([level] * (t1 - t0), pa.string()),
            "i": names.take(pa.array(table["i"][cut])),
            "j": names.take(pa.array(table["j"][cut])),
            "rank": pa.array((np.arange(t0, t1) % k).astype(np.int16)),
            "r": pa.array(table["r"][cut], pa.float32()),
            "near_duplicate": pa.array(table["near_duplicate"][cut]),
        })

    _write_blocks(writer, n_rows * k, block)


def compute_similarity(embeddings: Path, out_dir: Path, params: SimilarityParams) -> dict:
    """Write neighbours.parquet, near_duplicates.parquet, hard_negatives.parquet and stats.json.

    stats.json is the mark of a finished run: removed first, written last. Each table is
    replaced atomically, so a run that stops midway leaves old and new tables side by side,
    but never a stats.json beside them.
    """
    (out_dir / "stats.json").unlink(missing_ok=True)
    frame_ids, frame_subjects, vectors = read_embeddings(embeddings)
    subjects, codes = encode_subjects(frame_subjects)  # ids in first-seen order, (N,) int64
    del frame_subjects
    means, counts = subject_means(vectors, codes, subjects)
    own_views = int(counts.max()) - 1 if len(counts) else 0  # same-subject rows that can precede others
    extra = min(own_views, params.near_duplicate_extra_k)
    device = resolve_device(params.device)
    progress = Progress("similarity", len(vectors) + len(means), unit="query rows (frames, then subjects)")
    threshold = params.near_duplicate_r
    f_idx, f_val = topk_cosine(vectors, k=params.k + extra, block_rows=params.block_rows, device=device,
                               progress=progress.update)
    # rows whose list ends at or above the threshold may have more near-duplicates: all of theirs, exactly
    deep_frames = deep_rows(f_val, threshold, candidates=len(vectors) - 1)
    past_k_frames = pairs_above(vectors, deep_frames, threshold, device=device, subject=codes)
    del vectors
    s_idx, s_val = topk_cosine(means, k=params.k, block_rows=params.block_rows, device=device,
                               progress=progress.update)
    deep_subjects = deep_rows(s_val, threshold, candidates=len(means) - 1)
    past_k_subjects = pairs_above(means, deep_subjects, threshold, device=device)
    del means
    subject_table = neighbour_table(s_idx, s_val, subject=None, threshold=threshold)
    duplicates = union_subject_pairs(  # frame level over the whole search depth, without its (N * depth)-row table
        near_duplicate_pairs_blockwise(f_idx, f_val, subject=codes, threshold=threshold),
        near_duplicate_subject_pairs(subject_table, subject=None),
        near_duplicate_subject_pairs(flag_pairs(past_k_frames, subject=codes, threshold=threshold), subject=codes),
        near_duplicate_subject_pairs(flag_pairs(past_k_subjects, subject=None, threshold=threshold), subject=None))
    negatives = hard_negatives(subject_table, exclude=duplicates, h=params.hard_negatives)
    frame_search_k = int(f_idx.shape[1])
    kept = min(params.k, frame_search_k)  # columns are sorted: the first k are the plain top-k
    if kept < frame_search_k:  # the deeper columns only served the near-duplicates: free them
        f_idx, f_val = np.ascontiguousarray(f_idx[:, :kept]), np.ascontiguousarray(f_val[:, :kept])
    seconds = progress.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    with TableWriter(out_dir / "neighbours.parquet", NEIGHBOURS) as writer:
        _write_neighbours(writer, "frame", frame_ids, f_idx, f_val, subject=codes, threshold=params.near_duplicate_r)
        _write_neighbours(writer, "subject", subjects, s_idx, s_val, subject=None, threshold=params.near_duplicate_r)
    with TableWriter(out_dir / "near_duplicates.parquet", NEAR_DUPLICATES) as writer:
        def pairs(t0: int, t1: int) -> pa.Table:
            a = subjects.take(pa.array(duplicates["subject_a"][t0:t1]))  # codes: first-seen order
            b = subjects.take(pa.array(duplicates["subject_b"][t0:t1]))
            swap = pc.greater(a, b)  # the smaller id first, as documented (UTF-8 byte order = code point order)
            return pa.table({"subject_a": pc.if_else(swap, b, a), "subject_b": pc.if_else(swap, a, b),
                             "r": duplicates["r"][t0:t1]})

        _write_blocks(writer, len(duplicates["r"]), pairs)
    with TableWriter(out_dir / "hard_negatives.parquet", HARD_NEGATIVES) as writer:
        _write_blocks(writer, len(negatives["r"]), lambda t0, t1: pa.table({
            "subject_id": subjects.take(pa.array(negatives["subject"][t0:t1])),
            "negative_subject_id": subjects.take(pa.array(negatives["negative"][t0:t1])),
            "rank": negatives["rank"][t0:t1].astype(np.int16), "r": negatives["r"][t0:t1]}))
    stats = {"frames": len(frame_ids), "subjects": len(subjects), "k": params.k,
             "frame_neighbour_rows": f_idx.shape[0] * kept, "subject_neighbour_rows": len(subject_table["i"]),
             "near_duplicate_subject_pairs": len(duplicates["r"]), "hard_negative_rows": len(negatives["r"]),
             "frame_search_k": frame_search_k,
             # lists cut at or above near_duplicate_r, completed by a threshold search (flows.similarity.above)
             "rows_searched_past_k": {"frames": len(deep_frames), "subjects": len(deep_subjects)},
             "device": device}
    return write_stats(out_dir, stats, timing={"seconds": round(seconds, 3)})  # last: the run is complete

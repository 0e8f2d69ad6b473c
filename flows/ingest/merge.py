"""Concatenate shard parts into the stage's tables, streaming, in plan order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.schemas import FRAMES, REJECTS
from flows.tables import TableWriter, iter_batches


def concat_parts(parts: Sequence[Path], target: Path, schema) -> int:
    """Stream every part, in the given order, into ``target`` (atomic); return the row count."""
    with TableWriter(target, schema) as writer:
        for part in parts:
            for batch in iter_batches(part, schema):
                writer.write_batch(batch)
    return writer.rows_written


def frame_counts(frames: Path, rejects: Path, *, stage: str) -> dict[str, dict[str, int]]:
    """Per source: frames kept, frames rejected by ``stage``, and the rejects per reason.

    Only rejects of item_kind ``frame`` count toward a source's frames; annotation rejects
    (mask rows, pose files) are counted apart, under ``annotation_rejects``.
    """
    counts: dict[str, dict] = {}

    def entry(source: str) -> dict:
        return counts.setdefault(source, {"kept": 0, "rejected": 0, "reasons": {}, "annotation_rejects": {}})

    for batch in iter_batches(frames, FRAMES, columns=["source"]):
        for item in pc.value_counts(batch.column("source")).to_pylist():
            entry(item["values"])["kept"] += item["counts"]
    for batch in iter_batches(rejects, REJECTS, columns=["source", "item_kind", "stage", "reason"]):
        for row in batch.to_pylist():
            if row["stage"] != stage:
                continue
            e = entry(row["source"])
            bucket = e["reasons"] if row["item_kind"] == "frame" else e["annotation_rejects"]
            bucket[row["reason"]] = bucket.get(row["reason"], 0) + 1
            e["rejected"] += row["item_kind"] == "frame"
    return counts


def row_count(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows

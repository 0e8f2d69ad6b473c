"""Rejects rows and the counts that prove nothing was lost: discovered = accepted + rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from flows.schemas import FRAMES, REJECTS
from flows.tables import iter_batches

class AccountingError(RuntimeError):
    """A stage's counts do not add up: an input would be lost without a trace."""


FRAME = "frame"  # a reject that counts toward its source's frames
ANNOTATION = "annotation"  # a reject of a mask row or pose file, counted apart


def reject_row(*, item_id: str, source: str, kind: str, path: str | None, stage: str,
               reason: str, detail: str) -> dict[str, Any]:
    """One rejects row (see flows.schemas.REJECTS)."""
    return {"item_id": item_id, "source": source, "item_kind": kind, "path": path,
            "stage": stage, "reason": reason, "detail": detail}


def frame_counts(frames: Path, rejects: Path, *, stage: str) -> dict[str, dict[str, Any]]:
    """Per source: frames kept, frames rejected by ``stage``, and the rejects per reason.

    Only rejects of item_kind ``frame`` count toward a source's frames; annotation rejects
    are counted apart, under ``annotation_rejects``.
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
            bucket = e["reasons"] if row["item_kind"] == FRAME else e["annotation_rejects"]
            bucket[row["reason"]] = bucket.get(row["reason"], 0) + 1
            e["rejected"] += row["item_kind"] == FRAME
    return counts

"""The ``filter`` stage as plain functions: three streaming passes over the frames table.

Pass 1 applies the per-frame rules, counting the views each MVImgNet object keeps. Pass 2
drops the objects left with too few views, then runs the duplicate index over the rest, so an
image is not rejected as the copy of one whose object was already short of views. Pass 3 drops
the objects that the duplicates left short of views and writes the accepted frames; an image
whose only other copy was in such an object is then lost (it takes duplicates across objects at
the view limit). Rejects are written as they are found, the duplicates' after pass 3, which
names the image each one copies. Memory holds one batch, one byte per frame, the compact
duplicate index, about 12 bytes per unreadable mask file and the duplicates' rejects; never
the table.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from flows import ids, reasons
from flows.config.params import FilterParams
from flows.filtering.dedup import DuplicateIndex, hash64
from flows.filtering.rules import first_failure
from flows.accounting import FRAME, AccountingError, frame_counts, reject_row
from flows.schemas import FRAMES, REJECTS
from flows.tables import TableWriter, count_rows, iter_batches, iter_rows, write_json_atomic

STAGE = "filter"
MASK_SUFFIX = "#mask"  # ingest's annotation reject of a frame's mask file: "<frame_id>#mask"
# what pass 2 (views, then the duplicate index) reads of each frame
PASS2_COLUMNS = ["frame_id", "source", "subject_id", "image_path", "content_hash", "phash"]


def filter_frames(ingest_dir: Path, out_dir: Path, params: FilterParams) -> dict:
    """Filter ``ingest_dir/frames.parquet``; write accepted frames, all rejects and metrics."""
    frames_in = ingest_dir / "frames.parquet"
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected = np.zeros(count_rows(frames_in), dtype=bool)
    duplicates = DuplicateIndex(max_hamming=params.near_duplicate_hamming)
    unread_masks = UnreadMasks()
    with TableWriter(out_dir / "rejects.parquet", REJECTS) as rejects:
        for batch in iter_batches(ingest_dir / "rejects.parquet", REJECTS):
            rejects.write_batch(batch)  # one rejects table for the whole pipeline so far
            unread_masks.add(batch)
        unread_masks.freeze()

        def reject(index: int, row: dict, reason: str, detail: str) -> None:
            rejected[index] = True
            rejects.write_row(_reject(row, reason, detail))

        def too_few(views: Counter[str], row: dict) -> bool:
            return row["source"] == ids.MVIMGNET and views[row["subject_id"]] < params.min_views_per_object

        def too_few_detail(views: Counter[str], row: dict) -> str:
            return (f"{views[row['subject_id']]} accepted views < filter.min_views_per_object "
                    f"{params.min_views_per_object}")

        # 1: the per-frame rules
        views: Counter[str] = Counter()
        for index, row in enumerate(iter_rows(frames_in, FRAMES)):
            failure = first_failure(row, params)
            if failure is not None and failure[0] == reasons.MISSING_MASK:
                why = unread_masks.why(row["frame_id"])
                if why is not None:
                    failure = (reasons.MISSING_MASK, f"its mask file is in the mask tree but did not read ({why})")
            if failure is not None:
                reject(index, row, *failure)
            elif row["source"] == ids.MVIMGNET:
                views[row["subject_id"]] += 1
        # 2: objects already short of views go before the duplicate index, so that no image is
        # rejected as the copy of one that is dropped anyway
        kept: Counter[str] = Counter()
        copies: list[tuple[dict, int]] = []  # (duplicate's reject, row of the image it copies)
        for index, row in enumerate(iter_rows(frames_in, FRAMES, columns=PASS2_COLUMNS)):
            if rejected[index]:
                continue
            if too_few(views, row):
                reject(index, row, reasons.TOO_FEW_VIEWS, too_few_detail(views, row))
                continue
            failure = duplicates.check_and_add(image_path=f"{row['source']}:{row['image_path']}",
                                               subject_id=row["subject_id"], content_hash=row["content_hash"],
                                               phash=row["phash"], row=index)
            if failure is not None:  # its reject waits for pass 3 to name the image kept
                rejected[index] = True
                copies.append((_reject(row, *failure), duplicates.matched_row))
            elif row["source"] == ids.MVIMGNET:
                kept[row["subject_id"]] += 1
        # 3: objects that duplicates left short of views, and the accepted frames
        originals = {of for _, of in copies}
        names: dict[int, str] = {}  # row -> "source:image_path" of the images duplicates point to
        with TableWriter(out_dir / "frames.parquet", FRAMES) as accepted:
            for index, row in enumerate(iter_rows(frames_in, FRAMES)):
                if index in originals:
                    names[index] = f"{row['source']}:{row['image_path']}"
                if rejected[index]:
                    continue
                if too_few(kept, row):
                    rejects.write_row(_reject(row, reasons.TOO_FEW_VIEWS, too_few_detail(kept, row)))
                else:
                    accepted.write_row(row)
        for copy, of in copies:
            rejects.write_row({**copy, "detail": f"{copy['detail']}: {names[of]}"})
    return write_metrics(ingest_dir, out_dir)


class UnreadMasks:
    """Why ingest could not read a frame's mask file, from its ``<frame_id>#mask`` rejects.

    About 12 bytes a reject (a 64-bit hash of the frame id and the index of its detail among the
    distinct ones), not the strings: a whole mask tree in a format ingest rejects is millions.
    """

    def __init__(self):
        self._keys = array("Q")
        self._which = array("i")
        self._details: dict[str, int] = {}

    def add(self, rejects: pa.RecordBatch) -> None:
        columns = (rejects.column(c).to_pylist() for c in ("item_id", "reason", "detail"))
        for item, reason, detail in zip(*columns):
            if item.endswith(MASK_SUFFIX):
                self._keys.append(hash64(item[:-len(MASK_SUFFIX)]))
                self._which.append(self._details.setdefault(f"{reason}: {detail}", len(self._details)))

    def freeze(self) -> None:
        keys = np.frombuffer(self._keys, dtype=np.uint64)
        order = np.argsort(keys, kind="stable")
        self.keys, self.which = keys[order], np.frombuffer(self._which, dtype=np.int32)[order]
        self.details = list(self._details)
        del self._keys, self._which, self._details

    def why(self, frame_id: str) -> str | None:
        key = np.uint64(hash64(frame_id))
        at = int(np.searchsorted(self.keys, key))
        return self.details[self.which[at]] if at < len(self.keys) and self.keys[at] == key else None


def _reject(row: dict, reason: str, detail: str) -> dict:
    return reject_row(item_id=row["frame_id"], source=row["source"], kind=FRAME, path=row["image_path"],
                      stage=STAGE, reason=reason, detail=detail)


def write_metrics(ingest_dir: Path, out_dir: Path) -> dict:
    """Per source: discovered = accepted + rejected, with counts per stage and reason."""
    discovered = json.loads((ingest_dir / "summary.json").read_text())
    ingest = frame_counts(ingest_dir / "frames.parquet", out_dir / "rejects.parquet", stage="ingest")
    filtered = frame_counts(out_dir / "frames.parquet", out_dir / "rejects.parquet", stage=STAGE)
    metrics: dict = {}
    for source in sorted(set(discovered) | set(filtered)):
        found = discovered.get(source, {}).get("discovered", 0)
        ing, fil = ingest.get(source, {}), filtered.get(source, {})
        entry = {
            "discovered": found,
            "accepted": fil.get("kept", 0),
            "rejected_ingest": ing.get("rejected", 0),
            "rejected_filter": fil.get("rejected", 0),
            "reasons": {**{f"ingest/{k}": v for k, v in sorted(ing.get("reasons", {}).items())},
                        **{f"filter/{k}": v for k, v in sorted(fil.get("reasons", {}).items())}},
            "annotation_rejects": dict(sorted(ing.get("annotation_rejects", {}).items())),
        }
        if entry["accepted"] + entry["rejected_ingest"] + entry["rejected_filter"] != found:
            raise AccountingError(f"{source}: {found} discovered != {entry['accepted']} accepted + "
                                  f"{entry['rejected_ingest']} + {entry['rejected_filter']} rejected")
        metrics[source] = entry
    metrics["total"] = {k: sum(m[k] for m in metrics.values())
                        for k in ("discovered", "accepted", "rejected_ingest", "rejected_filter")}
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics

"""The frames-row builder and the per-shard writer of the ingest stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.probe import ImageProbe, MaskProbe
from flows.schemas import FRAMES, REJECTS
from flows.tables import TableWriter

def frame_row(*, frame_id: str, source: str, subject_id: str, class_id: str, class_name: str,
              image_path: str, image: ImageProbe, box: tuple[float, float, float, float],
              mask_path: str | None, mask: MaskProbe | None, frame_index: int | None = None,
              qvec=None, tvec=None, flags: dict[str, bool | None] | None = None) -> dict[str, Any]:
    """One frames row. ``box`` is (xmin, ymin, xmax, ymax) normalised."""
    xmin, ymin, xmax, ymax = box
    area = mask.area_frac if mask is not None else max(0.0, (xmax - xmin) * (ymax - ymin))
    flags = flags or {}
    return {
        "frame_id": frame_id, "source": source, "subject_id": subject_id,
        "class_id": class_id, "class_name": class_name, "image_path": image_path,
        "width": image.width, "height": image.height, "frame_index": frame_index,
        "pose_qvec": None if qvec is None else [float(v) for v in qvec],
        "pose_tvec": None if tvec is None else [float(v) for v in tvec],
        "box_xmin": xmin, "box_ymin": ymin, "box_xmax": xmax, "box_ymax": ymax,
        "mask_path": mask_path, "content_hash": image.content_hash, "phash": image.phash,
        "blur_score": image.blur_score, "subject_area_frac": area,
        "mask_largest_cc_frac": None if mask is None else mask.largest_cc_frac,
        "is_group_of": flags.get("is_group_of"), "is_depiction": flags.get("is_depiction"),
        "is_occluded": flags.get("is_occluded"), "is_truncated": flags.get("is_truncated"),
    }


@dataclass(frozen=True)
class ShardOutput:
    """The two Parquet parts one shard task writes (paths, so tasks pass no data)."""

    frames: Path
    rejects: Path


class ShardWriter:
    """Collects one shard's rows and writes them sorted, so shard output is deterministic.

    Rows are sorted by id within each group (:meth:`end_group`), and groups keep the order in
    which they were ended; a shard that never ends a group is one group. OpenImages ends one per
    image, so its rows follow ImageID order, like its partitions (ids of two images can
    interleave: ``openimages:8:m.png`` sorts after ``openimages:85/...``).
    """

    def __init__(self, out: ShardOutput):
        self.out = out
        self.frames: list[dict[str, Any]] = []
        self.rejects: list[dict[str, Any]] = []
        self._done: tuple[list[dict[str, Any]], list[dict[str, Any]]] = ([], [])

    def end_group(self) -> None:
        for rows, done, key in ((self.frames, self._done[0], "frame_id"), (self.rejects, self._done[1], "item_id")):
            rows.sort(key=lambda r: (r[key], r.get("path") or "", r.get("reason", "")))
            done.extend(rows)
            rows.clear()

    def close(self) -> ShardOutput:
        self.end_group()
        for path, schema, rows in ((self.out.frames, FRAMES, self._done[0]),
                                   (self.out.rejects, REJECTS, self._done[1])):
            with TableWriter(path, schema) as writer:
                writer.write_rows(rows)
        return self.out

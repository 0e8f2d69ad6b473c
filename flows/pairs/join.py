"""Streaming join of the frames, masks and embeddings tables, grouped by subject.

masks.parquet and embeddings.parquet are written in frames order, minus the frames their
stage rejected, so one merge pass aligns the three tables without an index in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from flows.schemas import FRAMES, MASKS
from flows.tables import fixed_size_list_to_numpy, iter_batches, iter_rows


@dataclass(frozen=True)
class SubjectFrame:
    frame_id: str
    subject_id: str
    source: str
    class_name: str
    image_path: str
    frame_index: int | None
    qvec: tuple[float, ...] | None
    box: tuple[float, float, float, float]  # from the mask (normalised x0, y0, x1, y1)
    area_frac: float  # from the mask
    embedding: np.ndarray  # (d,) float16, L2-normalised
    rle_counts: bytes  # the mask, COCO compressed RLE at (mask_size) pixels
    mask_size: tuple[int, int]  # (width, height) of the mask = of the image


def iter_embeddings(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(frame_id, embedding (d,) float16) in table order, one batch in memory at a time."""
    file = pq.ParquetFile(path)
    for batch in file.iter_batches(columns=["frame_id", "embedding"]):
        vectors = fixed_size_list_to_numpy(batch.column("embedding"))  # (B, d)
        yield from zip(batch.column("frame_id").to_pylist(), vectors)


def embedding_dim(path: Path) -> int:
    return pq.ParquetFile(path).schema_arrow.field("embedding").type.list_size


def iter_joined(frames: Path, masks: Path, embeddings: Path) -> Iterator[SubjectFrame]:
    """Frames that have both a mask and an embedding, in frames order."""
    mask_rows = iter_rows(masks, MASKS, columns=["frame_id", "width", "height", "bbox_x", "bbox_y",
                                                 "bbox_w", "bbox_h", "area_frac", "rle_counts"])
    emb_rows = iter_embeddings(embeddings)
    mask = next(mask_rows, None)
    emb = next(emb_rows, None)
    columns = ["frame_id", "subject_id", "source", "class_name", "image_path", "frame_index", "pose_qvec"]
    for batch in iter_batches(frames, FRAMES, columns=columns):
        for row in batch.to_pylist():
            fid = row["frame_id"]
            has_mask = mask is not None and mask["frame_id"] == fid
            has_emb = emb is not None and emb[0] == fid
            if has_mask and has_emb:
                w, h = mask["width"], mask["height"]
                box = (mask["bbox_x"] / w, mask["bbox_y"] / h,
                       (mask["bbox_x"] + mask["bbox_w"]) / w, (mask["bbox_y"] + mask["bbox_h"]) / h)
                qvec = tuple(row["pose_qvec"]) if row["pose_qvec"] is not None else None
                yield SubjectFrame(fid, row["subject_id"], row["source"], row["class_name"], row["image_path"],
                                   row["frame_index"], qvec, box, mask["area_frac"], emb[1],
                                   mask["rle_counts"], (w, h))
            if has_mask:
                mask = next(mask_rows, None)
            if has_emb:
                emb = next(emb_rows, None)
    leftover = mask["frame_id"] if mask is not None else emb[0] if emb is not None else None
    if leftover is not None:
        raise ValueError(f"{leftover} is not in {frames} in order: masks/embeddings must follow frames order")


def iter_subjects(frames: Iterator[SubjectFrame]) -> Iterator[list[SubjectFrame]]:
    """Group consecutive frames by subject; a multi-view subject must not reappear later.

    Only multi-view subjects are remembered for that check (single-view subjects, one per
    OpenImages box, cannot be split), which keeps the memory to one id per object.
    """
    done: set[str] = set()
    group: list[SubjectFrame] = []
    for frame in frames:
        if group and frame.subject_id != group[0].subject_id:
            if len(group) > 1 or group[0].frame_index is not None:
                done.add(group[0].subject_id)
            yield group
            group = []
        if frame.subject_id in done:
            raise ValueError(f"subject {frame.subject_id} is not contiguous in the frames table")
        group.append(frame)
    if group:
        yield group

"""Binary subject masks: decoding the data sets' mask files, and COCO RLE in and out.

A mask is a boolean array of shape (height, width) at image size. It is stored as COCO
compressed RLE (pycocotools, column-major) with its COCO bbox and area fraction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from flows import reasons
from flows.probe import UnreadableFile, decode_mask


def read_mask_file(path: Path, *, width: int, height: int) -> np.ndarray:
    """A data set's mask PNG as a (height, width) bool array, resized nearest if stored smaller.

    Raises :class:`UnreadableFile` (missing_file, empty_file or unreadable_mask).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableFile(reasons.MISSING_FILE, "mask file does not exist") from None  # the path column says which
    return decode_mask(data, width=width, height=height)


def encode_masks(masks: np.ndarray) -> list[dict]:
    """RLE of N masks given as a Fortran-ordered (H, W, N) uint8 array (pycocotools' layout).

    Returns per mask: rle_counts (bytes), bbox_x/y/w/h (COCO, pixels) and area_frac.
    """
    height, width, _ = masks.shape
    rles = mask_utils.encode(np.asfortranarray(masks, dtype=np.uint8))
    boxes = mask_utils.toBbox(rles)  # (N, 4) x, y, w, h
    areas = mask_utils.area(rles)
    return [
        {"rle_counts": rle["counts"], "bbox_x": float(box[0]), "bbox_y": float(box[1]),
         "bbox_w": float(box[2]), "bbox_h": float(box[3]), "area_frac": float(area) / (height * width)}
        for rle, box, area in zip(rles, boxes, areas)
    ]


def encode_mask(mask: np.ndarray) -> dict:
    """RLE of one (H, W) bool mask; see :func:`encode_masks`."""
    return encode_masks(mask[:, :, None])[0]


def decode_rle(counts: bytes, *, width: int, height: int) -> np.ndarray:
    """A masks.parquet row's RLE back to a (height, width) bool array."""
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Pixel box (x0, y0, x1, y1) around the mask's pixels (x1, y1 exclusive), None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)

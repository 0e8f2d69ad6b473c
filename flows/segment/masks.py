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

    Returns per mask: rle_counts (bytes), bbox_x/y/w/h (COCO, pixels) and area_frac. A mask is
    its nonzero pixels. For masks of 0 and one other value (0/1, 0/255) the counts are byte for
    byte ``pycocotools.mask.encode``'s, the box its ``toBbox`` and the area its ``area`` (tests
    compare them on many masks); pycocotools would also cut a run where two nonzero values meet.
    They are computed here in numpy, whose loops release the GIL, where pycocotools holds it for
    each whole call: the segment stage runs this in a thread beside the one that queues the next
    batch on the GPU, and a random-weights SAM's masks (~100k runs each) kept pycocotools busy
    50-160 ms a batch on a 2-core CPU (benchmarks/bench_rle.py, benchmarks/pipeline_gpu.md).
    """
    height, width, n = masks.shape
    out = []
    for k in range(n):
        mask = masks[:, :, k]  # (H, W), column after column in memory when masks is Fortran-ordered
        flat = mask.ravel(order="F") != 0  # (H*W,) column-major, COCO's pixel order
        area = int(np.count_nonzero(flat))
        box = (0.0, 0.0, 0.0, 0.0)
        if area:
            cols = np.flatnonzero(flat.reshape(width, height).any(axis=1))
            rows = np.flatnonzero(mask.any(axis=1))
            box = (float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1))
        out.append({"rle_counts": _coco_counts_string(_run_lengths(flat)), "bbox_x": box[0], "bbox_y": box[1],
                    "bbox_w": box[2], "bbox_h": box[3], "area_frac": area / (height * width) if height * width else 0.0})
    return out


def _run_lengths(flat: np.ndarray) -> np.ndarray:
    """COCO's uncompressed counts of a flat bool mask: run lengths alternating 0s and 1s, 0s first
    (so a mask starting with a 1 starts with a run of length 0)."""
    if flat.size == 0:
        return np.zeros(1, np.int64)
    ends = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where each run but the last ends
    counts = np.diff(ends, prepend=0, append=flat.size)  # (runs,)
    return np.concatenate(([0], counts)) if flat[0] else counts


def _coco_counts_string(counts: np.ndarray) -> bytes:
    """pycocotools' rleToString: each count (from the fourth on, less the count two before it) in
    signed 5-bit chunks, least significant first, bit 5 set on all but the last, plus 48 (ASCII
    48-111). A value takes the fewest chunks L whose 5L bits hold it in two's complement."""
    x = counts.astype(np.int64)
    x[3:] -= counts[1:-2]
    magnitude = np.where(x < 0, ~x, x)  # what the bits beside the sign bit must hold
    length = np.ones(x.size, np.int64)  # chunks per value
    longer = np.flatnonzero(magnitude >= 16)  # the values past 1 chunk: few, in a mask of any shape
    while longer.size:
        length[longer] += 1
        longer = longer[magnitude[longer] >= 1 << (5 * int(length[longer[0]]) - 1)]
    start = np.cumsum(length) - length
    out = np.empty(int(length[-1] + start[-1]), np.uint8)
    at = np.arange(x.size)
    for level in range(int(length.max())):
        if level:
            at = at[length[at] > level]  # the values with a chunk at this level
        chunk = (x[at] >> (5 * level)) & 0x1F | (length[at] > level + 1).astype(np.int64) << 5
        out[start[at] + level] = chunk + 48
    return out.tobytes()


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

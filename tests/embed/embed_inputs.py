"""Generated inputs of the embed tests: JPEGs, their subject masks as COCO RLE (pycocotools), tables."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from flows.config.params import EmbedParams, SourcesParams
from flows.schemas import FRAMES, MASKS
from flows.tables import TableWriter, write_table

BACKGROUND = (124, 116, 104)


def subject_image(rng: np.random.Generator, width: int, height: int,
                  box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) bool): a textured ellipse over a noisy background."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    stripes = ((xx // 4) % 2 == 0)[..., None]
    image[mask] = np.where(stripes, colour, 255 - colour)[mask]
    return image, mask


def rle_row(frame_id: str, subject_id: str, mask: np.ndarray) -> dict:
    """A MASKS row, made with pycocotools directly."""
    height, width = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle)
    return {"frame_id": frame_id, "subject_id": subject_id, "width": width, "height": height,
            "rle_counts": rle["counts"], "bbox_x": float(x), "bbox_y": float(y), "bbox_w": float(w),
            "bbox_h": float(h), "area_frac": float(mask.mean()), "quality": 1.0, "method": "provided",
            "model_id": None}


def frame_row(frame_id: str, source: str, subject_id: str, image_path: str, width: int, height: int) -> dict:
    """A FRAMES row; only the columns embed reads carry meaning."""
    return {"frame_id": frame_id, "source": source, "subject_id": subject_id, "class_id": "1",
            "class_name": "thing", "image_path": image_path, "width": width, "height": height,
            "frame_index": None, "pose_qvec": None, "pose_tvec": None, "box_xmin": 0.0, "box_ymin": 0.0,
            "box_xmax": 1.0, "box_ymax": 1.0, "mask_path": None, "content_hash": "0" * 64, "phash": 0,
            "blur_score": 100.0, "subject_area_frac": 0.2, "mask_largest_cc_frac": 1.0, "is_group_of": None,
            "is_depiction": None, "is_occluded": None, "is_truncated": None}


@dataclasses.dataclass
class EmbedInputs:
    frames: Path  # frames.parquet
    masks: Path  # masks.parquet
    sources: SourcesParams
    frame_ids: list[str]  # in frames order
    masked_ids: list[str]  # frames that have a mask row, in frames order


def make_inputs(root: Path, *, n: int = 8, seed: int = 0, unmasked: tuple[int, ...] = (),
                corrupt: tuple[int, ...] = ()) -> EmbedInputs:
    """``n`` frames alternating MVImgNet and OpenImages, each a JPEG with a mask row.

    ``unmasked``: frame numbers left without a mask row; ``corrupt``: frame numbers whose JPEG
    is truncated after the header.
    """
    rng = np.random.default_rng(seed)
    sources = SourcesParams(mvimgnet_root=str(root / "mvimgnet"), openimages_root=str(root / "openimages"))
    frames, masks = [], []
    for k in range(n):
        width, height = int(rng.integers(80, 160)), int(rng.integers(60, 120))
        bw, bh = int(rng.integers(12, width // 2)), int(rng.integers(12, height // 2))
        x0, y0 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
        image, mask = subject_image(rng, width, height, (x0, y0, x0 + bw, y0 + bh))
        if k % 2 == 0:
            source, subject = "mvimgnet", f"mvimgnet:1/0000000{k // 4}"
            rel = f"1/0000000{k // 4}/images/{k:03d}.jpg"
            file, frame_id = root / "mvimgnet" / rel, f"{subject}/{k:03d}.jpg"
        else:
            source, rel = "openimages", f"train/{k:016x}.jpg"
            frame_id = subject = f"openimages:{k:016x}/box{k}"
            file = root / "openimages" / rel
        file.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        data = buf.getvalue()
        file.write_bytes(data[: len(data) // 3] if k in corrupt else data)
        frames.append(frame_row(frame_id, source, subject, rel, width, height))
        if k not in unmasked:
            masks.append(rle_row(frame_id, subject, mask))
    masks.reverse()  # the join must not depend on the masks table's order
    write_table(root / "frames.parquet", FRAMES, frames)
    write_table(root / "masks.parquet", MASKS, masks)
    return EmbedInputs(root / "frames.parquet", root / "masks.parquet", sources,
                       [f["frame_id"] for f in frames], [m["frame_id"] for m in reversed(masks)])


def embed_params(out_dir: Path, **over) -> EmbedParams:
    return EmbedParams(out_dir=str(out_dir), **{"batch_size": 3, "num_workers": 0, **over})


def masks_in_frames_order(inputs: EmbedInputs) -> EmbedInputs:
    """Rewrite ``inputs.masks`` in frames order, as the segment stage writes it (make_inputs reverses it)."""
    position = {frame_id: k for k, frame_id in enumerate(inputs.frame_ids)}
    rows = sorted(pq.read_table(inputs.masks).to_pylist(), key=lambda row: position[row["frame_id"]])
    write_table(inputs.masks, MASKS, rows)
    return inputs


def make_bulky_inputs(root: Path, *, n: int, rle_bytes: int) -> EmbedInputs:
    """``n`` frames, each with a mask row of ``rle_bytes`` of RLE filler and no image file.

    For memory tests: the masks table is large in memory (small on disk: the filler
    compresses), while every frame fails fast, as missing_file, before its RLE is decoded.
    Masks are in frames order, in row groups of 128 rows (a Parquet reader holds a row group).
    """
    sources = SourcesParams(mvimgnet_root=str(root / "mvimgnet"), openimages_root=str(root / "openimages"))
    frame_ids = [f"openimages:{k:016x}/box" for k in range(n)]
    with TableWriter(root / "frames.parquet", FRAMES, buffer_rows=1024) as frames:
        frames.write_rows(frame_row(frame_id, "openimages", frame_id, f"train/{k:016x}.jpg", 32, 32)
                          for k, frame_id in enumerate(frame_ids))
    mask = {"width": 32, "height": 32, "bbox_x": 4.0, "bbox_y": 4.0, "bbox_w": 8.0, "bbox_h": 8.0,
            "area_frac": 0.05, "quality": 1.0, "method": "provided", "model_id": None}
    filler = b"x" * rle_bytes
    with TableWriter(root / "masks.parquet", MASKS, buffer_rows=128) as masks:
        masks.write_rows({**mask, "frame_id": frame_id, "subject_id": frame_id, "rle_counts": b"%016x" % k + filler}
                         for k, frame_id in enumerate(frame_ids))
    return EmbedInputs(root / "frames.parquet", root / "masks.parquet", sources, frame_ids, frame_ids)

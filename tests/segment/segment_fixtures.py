"""A tiny data set in the real layouts for the segment tests: images, mask PNGs, frames.parquet.

Ground-truth masks are ellipses drawn at image size; OpenImages masks are stored at half size
(as the real ones are stored below image resolution), so their ground truth is the nearest
resize back up, which is what ``expected`` holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from flows.config.params import FilterParams, SegmentParams, SourcesParams
from flows.schemas import FRAMES, REJECTS
from flows.tables import write_table


def frame(frame_id: str, source: str, image_path: str, width: int, height: int, *,
          box=(0.25, 0.25, 0.75, 0.75), mask_path: str | None = None) -> dict:
    """A frames row with plausible values in every column the segment stage does not read."""
    return {
        "frame_id": frame_id, "source": source, "subject_id": frame_id.rsplit("/", 1)[0],
        "class_id": "1", "class_name": "thing", "image_path": image_path, "width": width, "height": height,
        "frame_index": None, "pose_qvec": None, "pose_tvec": None,
        "box_xmin": box[0], "box_ymin": box[1], "box_xmax": box[2], "box_ymax": box[3],
        "mask_path": mask_path, "content_hash": "0" * 64, "phash": 0, "blur_score": 100.0,
        "subject_area_frac": 0.2, "mask_largest_cc_frac": None, "is_group_of": None,
        "is_depiction": None, "is_occluded": None, "is_truncated": None,
    }


def ellipse_mask(width: int, height: int, box) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    center = (int((x0 + x1) / 2), int((y0 + y1) / 2))
    cv2.ellipse(mask, center, (int((x1 - x0) / 2), int((y1 - y0) / 2)), 15, 0, 360, 255, -1)
    return mask


def photo(width: int, height: int, mask: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = cv2.resize(background, (width, height), interpolation=cv2.INTER_LINEAR)
    image[mask > 0] = rng.integers(0, 255, 3, dtype=np.uint8)
    return image


def save(path: Path, array: np.ndarray, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


@dataclass
class SegmentData:
    root: Path
    sources: SourcesParams
    filtering: FilterParams
    params: SegmentParams
    rows: list[dict] = field(default_factory=list)
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # frame_id -> ground-truth mask
    faults: dict[str, str] = field(default_factory=dict)  # frame_id -> expected reject reason
    sam_frames: set[str] = field(default_factory=set)  # frames with no mask: SAM from the box

    def write(self) -> None:
        write_table(Path(self.filtering.out_dir) / "frames.parquet", FRAMES, self.rows)
        write_table(Path(self.filtering.out_dir) / "rejects.parquet", REJECTS, [])


def make_data(root: Path) -> SegmentData:
    mv, mvm, oi = root / "mvimgnet", root / "mvimgnet_masks", root / "openimages"
    data = SegmentData(
        root=root,
        sources=SourcesParams(mvimgnet_root=str(mv), mvimgnet_mask_root=str(mvm), openimages_root=str(oi)),
        filtering=FilterParams(out_dir=str(root / "filter")),
        params=SegmentParams(out_dir=str(root / "segment"), batch_images=2, frames_per_shard=3),
    )
    # MVImgNet: two frames of one object with masks at image size (one PNG is missing on disk).
    for n, box in enumerate([(0.2, 0.3, 0.7, 0.8), (0.3, 0.2, 0.8, 0.7)]):
        w, h = 96, 72
        mask = ellipse_mask(w, h, box)
        name = f"{n:03d}.jpg"
        save(mv / "7" / "0a0b0c0d" / "images" / name, photo(w, h, mask, n), "JPEG")
        fid = f"mvimgnet:7/0a0b0c0d/{name}"
        data.rows.append(frame(fid, "mvimgnet", f"7/0a0b0c0d/images/{name}", w, h, box=box,
                               mask_path=f"7/0a0b0c0d/{name}.png"))
        if n == 0:
            save(mvm / "7" / "0a0b0c0d" / f"{name}.png", mask, "PNG")
            data.expected[fid] = mask > 127
        else:
            data.faults[fid] = "missing_file"
    # OpenImages: one image, two boxes: the first has a half-size mask PNG, the second none (SAM).
    w, h = 120, 80
    boxes = [(0.1, 0.2, 0.5, 0.9), (0.55, 0.1, 0.95, 0.6)]
    full = [ellipse_mask(w, h, b) for b in boxes]
    save(oi / "train" / "abc123.jpg", photo(w, h, np.maximum(*full), 7), "JPEG")
    small = cv2.resize(full[0], (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)
    save(oi / "masks" / "a" / "abc123_m01_x.png", small, "PNG")
    data.expected["openimages:abc123/box0"] = np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST)) > 127
    data.rows.append(frame("openimages:abc123/box0", "openimages", "train/abc123.jpg", w, h, box=boxes[0],
                           mask_path="masks/a/abc123_m01_x.png"))
    data.rows.append(frame("openimages:abc123/box1", "openimages", "train/abc123.jpg", w, h, box=boxes[1]))
    data.sam_frames.add("openimages:abc123/box1")
    # OpenImages: a second image for SAM, and a truncated JPEG that no longer decodes.
    mask = ellipse_mask(w, h, boxes[1])
    save(oi / "train" / "def456.jpg", photo(w, h, mask, 8), "JPEG")
    data.rows.append(frame("openimages:def456/box0", "openimages", "train/def456.jpg", w, h, box=boxes[1]))
    data.sam_frames.add("openimages:def456/box0")
    save(oi / "train" / "bad999.jpg", photo(w, h, mask, 9), "JPEG")
    bad = oi / "train" / "bad999.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    data.rows.append(frame("openimages:bad999/box0", "openimages", "train/bad999.jpg", w, h, box=boxes[1]))
    data.faults["openimages:bad999/box0"] = "unreadable_image"
    data.write()
    return data

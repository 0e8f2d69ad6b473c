"""OpenImages V7 in the real layout: photos with pasted subjects, boxes and segmentation CSVs.

    <oi_root>/train/<ImageID>.jpg
    <oi_root>/oidv6-train-annotations-bbox.csv
    <oi_root>/train-annotations-object-segmentation.csv
    <oi_root>/masks/<ImageID[0]>/<ImageID>_<label without slashes>_<BoxID>.png   (reduced size)
    <oi_root>/oidv7-class-descriptions.csv

Subjects are the MVImgNet renders' cut-outs (no second render), scaled and pasted into cells of a
grid so they never overlap; box coordinates come from the pasted masks, so boxes, masks and
pixels agree exactly. Each image is written by :func:`write_image` (one task per shard), which
leaves its CSV rows as JSON in scratch; :func:`finish` merges them and adds the near-duplicate.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from flows import ids
from flows.sample import faults, photos
from flows.sample.plan import BoxPlan, ImagePlan, OpenImagesPlan, hex_id, rng_for
from flows.sample.render import SHAPES

SPLIT = "train"
BOXES_CSV = "oidv6-train-annotations-bbox.csv"
SEGMENTATION_CSV = "train-annotations-object-segmentation.csv"
CLASSES_CSV = "oidv7-class-descriptions.csv"
BOX_HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
              "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
SEG_HEADER = ["MaskPath", "ImageID", "LabelName", "BoxID", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax",
              "PredictedIoU", "Clicks"]
EXTRA_CLASSES = ("Person", "Tree", "Dog", "Coffee cup")  # listed in the class table, never boxed
MARGIN = 8  # pixels between a subject and its cell's edges
DUPLICATE_QUALITY = 75  # the near-duplicate's JPEG quality (the originals use photos.JPEG_QUALITY)
DUPLICATE_BRIGHTNESS = 1.06


def label_name(display_name: str) -> str:
    """A stable Freebase-style MID ("/m/0" + 5 characters) for a display name."""
    digest = hashlib.sha256(display_name.encode("utf-8")).hexdigest()
    return "/m/0" + digest[:5]


def mask_path_name(image_id: str, label: str, box_id: str) -> str:
    """MaskPath as OpenImages writes it: the label loses its slashes (/m/0k4j -> m0k4j)."""
    return f"{image_id}_{label.replace('/', '')}_{box_id}.png"


def load_cutouts(manifests: list[Path]) -> list[dict]:
    """Every view's cut-out from the object manifests, in object then view order."""
    out = []
    for m in sorted(manifests):
        data = json.loads(Path(m).read_text())
        for v, entry in enumerate(data["views"]):
            out.append({**entry, "object_index": data["object_index"], "view": v, "oi_name": data["oi_name"]})
    return out


def _cells(width: int, height: int, k: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    if k == 1:
        return [(0, 0, width, height)]
    if k == 2:
        if width >= height:
            return [(0, 0, width // 2, height), (width // 2, 0, width, height)]
        return [(0, 0, width, height // 2), (0, height // 2, width, height)]
    w2, h2 = width // 2, height // 2
    grid = [(0, 0, w2, h2), (w2, 0, width, h2), (0, h2, w2, height), (w2, h2, width, height)]
    return [grid[i] for i in sorted(int(j) for j in rng.permutation(4)[:k])]


def _scaled(path: str, width: int, height: int) -> np.ndarray:
    """A cut-out resized to (height, width, 4)."""
    return photos.resize_premultiplied(photos.read_rgba_png(Path(path)), width, height)


def _fit(c: dict, cell_w: int, cell_h: int) -> float:
    """Largest scale of cut-out ``c`` that fits the cell inside the margins."""
    return min((cell_w - 2 * MARGIN) / c["width"], (cell_h - 2 * MARGIN) / c["height"])


def _candidates(cutouts: list[dict], used: set[int], ok) -> list[dict]:
    """Cut-outs passing ``ok``, preferring objects not yet in the image."""
    fresh = [c for c in cutouts if c["object_index"] not in used and ok(c)]
    return fresh or [c for c in cutouts if ok(c)]


def _aspect(c: dict) -> float:
    return c["width"] / c["height"]


def _place_clean(rng, cutouts, used, cell, image_area, k) -> list[tuple[dict, int, int, int, int]]:
    """One subject covering 6% to ``hi`` of the image (mask area), inside its cell."""
    cw, ch = cell[2] - cell[0], cell[3] - cell[1]
    hi = {1: 0.30, 2: 0.20}.get(k, 0.14)

    def max_frac(c):  # the largest mask share this cut-out reaches in the cell
        return c["fill"] * c["width"] * c["height"] * _fit(c, cw, ch) ** 2 / image_area

    cands = _candidates(cutouts, used, lambda c: c["fill"] >= 0.4 and 0.6 <= _aspect(c) <= 1.6 and max_frac(c) >= 0.07)
    if not cands:
        raise ValueError(f"no cut-out fits a {cw}x{ch} cell")
    c = cands[int(rng.integers(len(cands)))]
    frac = rng.uniform(0.06, min(max_frac(c), hi))
    return [_at(rng, c, np.sqrt(frac * image_area / (c["fill"] * c["width"] * c["height"])), cell)]


def _at(rng, c, scale, cell):
    cx0, cy0, cx1, cy1 = cell
    w, h = max(1, round(c["width"] * scale)), max(1, round(c["height"] * scale))
    x = cx0 + MARGIN + int(rng.integers(0, max(1, cx1 - cx0 - 2 * MARGIN - w + 1)))
    y = cy0 + MARGIN + int(rng.integers(0, max(1, cy1 - cy0 - 2 * MARGIN - h + 1)))
    return (c, x, y, w, h)


def _place_tiny(rng, cutouts, used, cell, image_area):
    """One subject whose box covers 0.4% to 0.8% of the image, at least 24 px a side."""
    cands = _candidates(cutouts, used, lambda c: 0.8 <= _aspect(c) <= 1.25)
    c = cands[int(rng.integers(len(cands)))]
    area = rng.uniform(0.004, 0.008) * image_area
    s = max(np.sqrt(area / (c["width"] * c["height"])), 24.0 / min(c["width"], c["height"]))
    return [_at(rng, c, s, cell)]


def _place_group(rng, cutouts, used, cell, image_area):
    """Two views of one object overlapping side by side under one box: an IsGroupOf box."""
    def pairable(c):
        return 0.6 <= _aspect(c) <= 1.0 and sum(0.6 <= _aspect(d) <= 1.0 and d["object_index"] == c["object_index"]
                                                 for d in cutouts) >= 2

    cands = _candidates(cutouts, used, pairable)
    if not cands:
        raise ValueError("the group-of box needs two cut-outs of one object")
    objects = sorted({c["object_index"] for c in cands})
    obj = objects[int(rng.integers(len(objects)))]
    views = [c for c in cands if c["object_index"] == obj]
    pair = [views[int(i)] for i in rng.permutation(len(views))[:2]]
    cx0, cy0, cx1, cy1 = cell
    h = int(min(cy1 - cy0 - 2 * MARGIN, np.sqrt(rng.uniform(0.10, 0.18) * image_area / 1.6)))
    ws = [_aspect(c) for c in pair]  # widths per unit height
    h = int(min(h, (cx1 - cx0 - 2 * MARGIN) / (0.7 * ws[0] + ws[1])))
    ws = [round(w * h) for w in ws]
    step = round(0.7 * ws[0])  # the second subject overlaps the first by 30%
    _, x, y, _, _ = _at(rng, {"width": step + ws[1], "height": h}, 1.0, cell)
    return [(pair[0], x, y, ws[0], h), (pair[1], x + step, y, ws[1], h)]


def _fmt(v: float) -> str:
    return f"{v:.6f}"


def _clicks(rng, mask: np.ndarray, box: tuple[int, int, int, int]) -> str:
    h, w = mask.shape
    x0, y0, x1, y1 = box
    out = []
    ys, xs = np.nonzero(mask)
    for i in rng.choice(len(xs), size=3, replace=False):
        out.append(f"{(xs[i] + 0.5) / w:.5f} {(ys[i] + 0.5) / h:.5f} 1")
    bys, bxs = np.nonzero(~mask[y0:y1, x0:x1])
    if len(bxs):
        i = int(rng.integers(len(bxs)))
        out.append(f"{(x0 + bxs[i] + 0.5) / w:.5f} {(y0 + bys[i] + 0.5) / h:.5f} 0")
    return ";".join(out)


def _compose(image: ImagePlan, cutouts: list[dict],
             rng) -> tuple[np.ndarray, list[tuple[BoxPlan, np.ndarray, str]]]:
    """The image (H, W, 3) and, per box, its full-resolution mask (H, W) and LabelName."""
    W, H = image.width, image.height
    canvas = photos.cover_crop(image.background, W, H, rng, zoom=float(rng.uniform(1.0, 1.4)))
    used: set[int] = set()
    out = []
    for box, cell in zip(image.boxes, _cells(W, H, len(image.boxes), rng)):
        if box.role == "clean":
            pieces = _place_clean(rng, cutouts, used, cell, W * H, len(image.boxes))
        elif box.role == "tiny":
            pieces = _place_tiny(rng, cutouts, used, cell, W * H)
        else:
            pieces = _place_group(rng, cutouts, used, cell, W * H)
        used.update(c["object_index"] for c, *_ in pieces)
        mask = np.zeros((H, W), dtype=bool)
        for c, x, y, w, h in pieces:
            layer = _scaled(c["path"], w, h)
            canvas = photos.over(canvas, layer, x, y)
            mask[y:y + h, x:x + w] |= layer[..., 3] >= 128
        out.append((box, mask, label_name(pieces[0][0]["oi_name"])))
    return canvas, out


def _annotate(image: ImagePlan, box: BoxPlan, mask: np.ndarray, label: str, rng, oi_root: Path,
              mask_scale: float) -> tuple[list[str], list[list[str]], list[faults.FaultRecord]]:
    """One box's CSV row, its segmentation rows (writing the mask PNG) and its planted faults."""
    H, W = mask.shape
    ys, xs = np.nonzero(mask)
    px = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)  # x0, y0, x1, y1
    coords = [_fmt(px[0] / W), _fmt(px[2] / W), _fmt(px[1] / H), _fmt(px[3] / H)]  # XMin XMax YMin YMax
    box_row = [image.image_id, "xclick", label, "1", *coords, "0", "0",
               "1" if box.role == "group_of" else "0", "0", "0"]
    box_key = ids.openimages_box_key(image.image_id, label, *map(float, coords))
    frame_id = ids.openimages_frame_id(image.image_id, box_key)
    box_id = hex_id(image.seed, 8, "box", box.slot)
    seg_rows, records = [], []
    if box.has_mask:
        name = mask_path_name(image.image_id, label, box_id)
        small = photos.resize(mask.astype(np.uint8) * 255, max(1, round(W * mask_scale)),
                              max(1, round(H * mask_scale)), nearest=True)
        photos.write_mask_png(small >= 128, oi_root / "masks" / image.image_id[0] / name)
        seg_rows.append([name, image.image_id, label, box_id, *coords, f"{rng.uniform(0.75, 0.95):.5f}",
                         _clicks(rng, mask, px)])
    if box.outside_root_row:
        seg_rows.append([faults.OUTSIDE_ROOT_MASK_PATH, image.image_id, label, box_id, *coords,
                         f"{rng.uniform(0.75, 0.95):.5f}", _clicks(rng, mask, px)])
        records.append(faults.record("mask_path_outside_root", ids.OPENIMAGES, faults.OUTSIDE_ROOT_MASK_PATH,
                                     frame_id))
    if box.role in ("tiny", "group_of"):
        fault = "tiny_subject" if box.role == "tiny" else "group_of"
        records.append(faults.record(fault, ids.OPENIMAGES, f"{SPLIT}/{image.image_id}.jpg", frame_id))
    return box_row, seg_rows, records


def write_image(image: ImagePlan, cutouts: list[dict], oi_root: Path, mask_scale: float, scratch: Path) -> Path:
    """Compose and write one image, its mask PNGs and its CSV rows (a JSON file in scratch)."""
    rng = rng_for(image.seed, "compose")
    canvas, boxes = _compose(image, cutouts, rng)
    box_rows, seg_rows, records = [], [], []
    for box, mask, label in boxes:
        box_row, segs, recs = _annotate(image, box, mask, label, rng, oi_root, mask_scale)
        box_rows.append(box_row)
        seg_rows += segs
        records += recs
    image_path = oi_root / SPLIT / f"{image.image_id}.jpg"
    if image.empty_file:
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(b"")
        records.append(faults.record("empty_file", ids.OPENIMAGES, f"{SPLIT}/{image.image_id}.jpg"))
    else:
        photos.write_jpeg(canvas, image_path)
    rows_path = scratch / "openimages" / f"{image.index:04d}.json"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text(json.dumps({"boxes": box_rows, "segmentation": seg_rows,
                                     "faults": [dataclasses.asdict(r) for r in records]}, indent=1))
    return rows_path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")


def _near_duplicate(oi_root: Path, source_id: str, dup_id: str) -> None:
    with Image.open(oi_root / SPLIT / f"{source_id}.jpg") as im:
        brighter = ImageEnhance.Brightness(im.convert("RGB")).enhance(DUPLICATE_BRIGHTNESS)
    photos.write_jpeg(np.asarray(brighter), oi_root / SPLIT / f"{dup_id}.jpg", quality=DUPLICATE_QUALITY)


def finish(plan: OpenImagesPlan, rows_paths: list[Path], oi_root: Path) -> list[faults.FaultRecord]:
    """Merge the per-image rows into the CSVs, write the class table and the near-duplicate."""
    box_rows, seg_rows, records = [], [], []
    for p in sorted(rows_paths):
        data = json.loads(Path(p).read_text())
        box_rows += data["boxes"]
        seg_rows += data["segmentation"]
        records += [faults.FaultRecord(**r) for r in data["faults"]]
    if plan.duplicate_source is not None:
        _near_duplicate(oi_root, plan.duplicate_source, plan.duplicate_id)
        box_rows += [[plan.duplicate_id, *r[1:]] for r in box_rows if r[0] == plan.duplicate_source]
        records.append(faults.record("near_duplicate", ids.OPENIMAGES, f"{SPLIT}/{plan.duplicate_id}.jpg"))
    _write_csv(oi_root / BOXES_CSV, BOX_HEADER, sorted(box_rows))
    _write_csv(oi_root / SEGMENTATION_CSV, SEG_HEADER, sorted(seg_rows, key=lambda r: (r[1], r[3], r[0])))
    names = sorted({s.oi_name for s in SHAPES} | set(EXTRA_CLASSES))
    _write_csv(oi_root / CLASSES_CSV, ["LabelName", "DisplayName"], sorted([label_name(n), n] for n in names))
    return records

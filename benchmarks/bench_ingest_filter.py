"""Benchmark: ingest + filter throughput and peak memory as the input grows.

Generates, per size, a metadata-heavy data set in the real formats: an MVImgNet tree
(COLMAP images.bin with poses, 20 frames per object) and OpenImages CSVs (2 boxes per
image, a mask row per box). Images are tiny (64 px) distinct JPEGs and every mask file is a
hard link to one PNG, so the run measures the pipeline's per-frame work (CSV and COLMAP
parsing, the join, probing, the Parquet writes, rules and duplicate index), not JPEG
decoding of large photos. Each size runs the real Prefect flows in a fresh process, which
reports its own peak RSS.

    python benchmarks/bench_ingest_filter.py [--sizes 10000 100000] [--keep]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRAMES_PER_OBJECT = 20
BOXES_PER_IMAGE = 2
SIDE = 64
BOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
SEG_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"


def _jpeg(rng: np.random.Generator) -> bytes:
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((SIDE, SIDE), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _mask_png() -> bytes:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


class _MaskLinker:
    """Hard links to one mask PNG; a new copy every 30k links (file systems cap link counts)."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.data = folder, 0, _mask_png()

    def link(self, target: Path) -> None:
        master = self.folder / f"mask-{self.count // 30_000}.png"
        if not master.exists():
            master.write_bytes(self.data)
        os.link(master, target)
        self.count += 1


def generate(root: Path, n_frames: int, seed: int = 0) -> None:
    """Half the frames as MVImgNet objects, half as OpenImages boxes."""
    from flows.readers import colmap

    rng = np.random.default_rng(seed)
    mv, masks, oi = root / "mvimgnet", root / "mvimgnet_masks", root / "openimages"
    root.mkdir(parents=True)
    masks_pool = _MaskLinker(root)
    (mv).mkdir()
    (mv / "mvimgnet_category.txt").write_text("".join(f"{c},class {c}\n" for c in range(10)))
    n_objects = (n_frames // 2) // FRAMES_PER_OBJECT
    for o in range(n_objects):
        cls, obj = str(o % 10), f"{o:08x}"
        images, mask_dir, sparse = mv / cls / obj / "images", masks / cls / obj, mv / cls / obj / "sparse" / "0"
        for d in (images, mask_dir, sparse):
            d.mkdir(parents=True)
        poses = []
        for f in range(FRAMES_PER_OBJECT):
            name = f"{f + 1:03d}.jpg"
            (images / name).write_bytes(_jpeg(rng))
            masks_pool.link(mask_dir / f"{name}.png")
            angle = 2 * np.pi * f / FRAMES_PER_OBJECT
            rot = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
            poses.append(colmap.ImagePose(id=f + 1, qvec=colmap.rotmat_to_qvec(rot), tvec=(0.0, 0.0, 4.0),
                                          camera_id=1, name=name))
        colmap.write_images_binary(poses, sparse / "images.bin")
    (oi / "train").mkdir(parents=True)
    n_images = (n_frames - n_objects * FRAMES_PER_OBJECT) // BOXES_PER_IMAGE
    with open(oi / "boxes.csv", "w") as boxes, open(oi / "seg.csv", "w") as segs:
        boxes.write(BOX_HEADER)
        segs.write(SEG_HEADER)
        for i in range(n_images):
            image_id = f"{i:016x}"
            (oi / "train" / f"{image_id}.jpg").write_bytes(_jpeg(rng))
            mask_dir = oi / "masks" / image_id[0]
            mask_dir.mkdir(parents=True, exist_ok=True)
            for b in range(BOXES_PER_IMAGE):
                x0, x1, y0, y1 = 0.1 + 0.4 * b, 0.45 + 0.4 * b, 0.2, 0.6
                boxes.write(f"{image_id},xclick,/m/0{b},1,{x0:.6f},{x1:.6f},{y0:.6f},{y1:.6f},0,0,0,0,0\n")
                mask_name = f"{image_id}_m0{b}_{b:08x}.png"
                masks_pool.link(mask_dir / mask_name)
                segs.write(f"{mask_name},{image_id},/m/0{b},{b:08x},{x0:.6f},{x1:.6f},{y0:.6f},{y1:.6f},0.9,\n")
    (oi / "classes.csv").write_text("LabelName,DisplayName\n/m/00,thing zero\n/m/01,thing one\n")


def write_params(root: Path) -> Path:
    params = {
        "sources": {
            "mvimgnet_root": str(root / "mvimgnet"), "mvimgnet_mask_root": str(root / "mvimgnet_masks"),
            "mvimgnet_categories": str(root / "mvimgnet" / "mvimgnet_category.txt"),
            "openimages_root": str(root / "openimages"), "openimages_boxes_csv": "boxes.csv",
            "openimages_segmentation_csv": "seg.csv", "openimages_classes_csv": "classes.csv",
        },
        "ingest": {"out_dir": str(root / "ingest"), "frames_per_shard": 2048, "max_workers": 2},
        # Permissive thresholds: tiny images must go through every rule and the duplicate index.
        "filter": {"out_dir": str(root / "filter"), "min_image_side": 16, "min_box_side": 4,
                   "min_blur_score": 0.0, "box_aspect_min": 0.1, "box_aspect_max": 10.0,
                   "mvimgnet_area": {"min": 0.0, "max": 1.0}, "openimages_area": {"min": 0.0, "max": 1.0}},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def child(params_path: str) -> None:
    """Run the two stage flows in this process; print timings and this process's peak RSS."""
    from flows.filtering.flow import main as filter_main
    from flows.ingest.flow import main as ingest_main

    t0 = time.perf_counter()
    ingest_main(params_path)
    t1 = time.perf_counter()
    filter_main(params_path)
    t2 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"ingest_s": t1 - t0, "filter_s": t2 - t1, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=ROOT / "bench-out" / "ingest_filter")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    results = []
    for n in args.sizes:
        root = args.work / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        generate(root, n)
        gen_s = time.perf_counter() - t
        params = write_params(root)
        proc = subprocess.run([sys.executable, __file__, "--child", str(params)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"size {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        res = json.loads(line[len("RESULT "):])
        metrics = json.loads((root / "filter" / "metrics.json").read_text())
        res.update(frames=metrics["total"]["discovered"], accepted=metrics["total"]["accepted"], generate_s=gen_s)
        res["frames_per_s"] = res["frames"] / (res["ingest_s"] + res["filter_s"])
        results.append(res)
        print(json.dumps(res))
        if not args.keep:
            shutil.rmtree(root)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"frames x{b['frames'] / a['frames']:.0f}: peak RSS {a['peak_rss_mb']:.0f} MB -> {b['peak_rss_mb']:.0f} MB "
              f"(x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}); rate {a['frames_per_s']:.0f} -> {b['frames_per_s']:.0f} frames/s")


if __name__ == "__main__":
    main()

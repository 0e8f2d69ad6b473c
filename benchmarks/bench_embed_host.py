"""Benchmark: the embed stage's per-image host work, single process, split into its steps.

What one DataLoader worker does per frame (flows.embed.preprocess.SubjectCutter), timed in
this process on generated JPEGs (benchmarks/bench_embed.py's photos: a textured elliptic
subject 25-60 % of the width, 30-70 % of the height):

- ``jpeg_decode``: open and decode the image file (``SubjectCutter.decode``);
- ``mask_decode``: the COCO RLE to the mask inside the bbox, bbox and square placed on the
  decoded grid (``SubjectCutter.place``);
- ``cut``: crop to the bbox, paint the background, pad to square (``paint_square``);
- ``transform``: the model's eval transform up to its ToTensor (resize to S, (3, S, S) uint8);
- ``total``: ``SubjectCutter.subject_pixels`` on the same rows, timed on its own.

for three cutters, taking turns within each pass: ``draft`` (the stage's: JPEGs decoded at
1/k where the subject allows), ``no_draft`` (``jpeg_draft=False``: every image decoded whole)
and, with ``--compare-with FILE``, ``compared``: the SubjectCutter of another version of
flows/embed/preprocess.py (one from before the split into decode/place has its steps timed
as it ran them: whole decode, pycocotools' whole mask, segment_subject).
``draft_scales`` counts the k chosen per size.

    git show 9efe502:flows/embed/preprocess.py > /tmp/old_preprocess.py  # before JPEG drafts
    python benchmarks/bench_embed_host.py --compare-with /tmp/old_preprocess.py  # 512x384, 1600x1200
    python benchmarks/bench_embed_host.py --sizes 4000x3000 --n-images 6 --passes 3

No model is built: the transform is open_clip's eval transform for ``--image-size``. torch
runs one thread, as in a DataLoader worker. Timings on a shared machine move with its load:
compare cutters within one run (``loadavg_before``/``loadavg_after`` are reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import open_clip
from bench_embed import _photo
from PIL import Image
from pycocotools import mask as mask_utils

from flows.embed import preprocess as pp

BACKGROUND = (124, 116, 104)  # EmbedParams' default background_rgb


def make_rows(root: Path, n: int, width: int, height: int, seed: int = 0) -> list[dict]:
    """``n`` JPEG files under ``root`` and their work rows (pp.WORK_COLUMNS)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        data, mask = _photo(rng, width, height)
        path = root / f"{width}x{height}-{k:03d}.jpg"
        path.write_bytes(data)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        rows.append({"image_file": str(path), "rle_counts": rle["counts"], "mask_width": width,
                     "mask_height": height, "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h})
    return rows


def split_once(cutter, row: dict) -> dict[str, float]:
    """Seconds of each step of one frame, run as ``cutter.subject_pixels`` runs them."""
    if not hasattr(cutter, "place"):
        return _split_whole_decode(cutter, row)
    t0 = time.perf_counter()
    decoded = cutter.decode(row)
    t1 = time.perf_counter()
    placement = cutter.place(row, decoded)
    t2 = time.perf_counter()
    subject = cutter.module.paint_square(decoded.image, placement, cutter.background)
    t3 = time.perf_counter()
    cutter.preprocess(subject)
    t4 = time.perf_counter()
    return {"jpeg_decode": t1 - t0, "mask_decode": t2 - t1, "cut": t3 - t2, "transform": t4 - t3}


def _split_whole_decode(cutter, row: dict) -> dict[str, float]:
    """The same for preprocess.py before JPEG draft decoding (a ``--compare-with`` file of then)."""
    module = cutter.module
    t0 = time.perf_counter()
    image = module._open_image(Path(row["image_file"]))
    t1 = time.perf_counter()
    mask = module.decode_rle(row["rle_counts"], width=row["mask_width"], height=row["mask_height"])
    t2 = time.perf_counter()
    subject = module.segment_subject(image, mask, (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]),
                                     cutter.background)
    t3 = time.perf_counter()
    cutter.preprocess(subject)
    t4 = time.perf_counter()
    return {"jpeg_decode": t1 - t0, "mask_decode": t2 - t1, "cut": t3 - t2, "transform": t4 - t3}


def measure(cutters: dict[str, object], rows: list[dict], passes: int) -> dict[str, dict[str, float]]:
    """ms/img of each step and of the whole, per cutter: a pass's mean over rows, median over passes.

    The cutters take turns within each pass, so that a change in the machine's load hits all alike.
    """
    per_pass: dict[str, dict[str, list[float]]] = {name: {} for name in cutters}
    for _ in range(passes):
        for name, cutter in cutters.items():
            sums: dict[str, float] = {}
            for row in rows:
                for step, seconds in split_once(cutter, row).items():
                    sums[step] = sums.get(step, 0.0) + seconds
            start = time.perf_counter()
            for row in rows:
                cutter.subject_pixels(row)
            sums["total"] = time.perf_counter() - start
            for step, seconds in sums.items():
                per_pass[name].setdefault(step, []).append(1000 * seconds / len(rows))
    return {name: {step: round(statistics.median(values), 2) for step, values in steps.items()}
            for name, steps in per_pass.items()}


def load_module(path: Path):
    """Another version of flows/embed/preprocess.py, e.g. ``git show HEAD~1:flows/embed/preprocess.py > old.py``."""
    spec = importlib.util.spec_from_file_location("preprocess_compared", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_cutter(module, host, image_size: int, **options):
    cutter = module.SubjectCutter(preprocess=host, image_size=image_size, background=BACKGROUND, **options)
    cutter.module = module
    return cutter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["512x384", "1600x1200"], help="JPEG sizes, WxH")
    parser.add_argument("--image-size", type=int, default=224, help="the model input side S")
    parser.add_argument("--n-images", type=int, default=16, help="distinct JPEGs per size")
    parser.add_argument("--passes", type=int, default=5, help="passes over the images; medians reported")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another preprocess.py to time alongside (reported as 'compared')")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker (torch's _worker_loop does the same)
    host = pp.split_preprocess(open_clip.image_transform(args.image_size, is_train=False)).host
    cutters = {"draft": make_cutter(pp, host, args.image_size),
               "no_draft": make_cutter(pp, host, args.image_size, jpeg_draft=False)}
    if args.compare_with is not None:
        cutters["compared"] = make_cutter(load_module(args.compare_with), host, args.image_size)
    root = Path(tempfile.mkdtemp(prefix="bench-embed-host-"))
    result = {"image_size": args.image_size, "n_images": args.n_images, "passes": args.passes,
              "compare_with": str(args.compare_with) if args.compare_with else None,
              "loadavg_before": [round(v, 2) for v in os.getloadavg()], "ms_per_img": {}, "draft_scales": {}}
    try:
        for size in args.sizes:
            width, height = (int(v) for v in size.split("x"))
            rows = make_rows(root, args.n_images, width, height)
            scales = [cutters["draft"].decode(row).scale for row in rows]
            result["draft_scales"][size] = {k: scales.count(k) for k in sorted(set(scales))}
            for cutter in cutters.values():
                cutter.subject_pixels(rows[0])  # warm-up
            result["ms_per_img"][size] = measure(cutters, rows, args.passes)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result.update(loadavg_after=[round(v, 2) for v in os.getloadavg()], cpus=os.cpu_count(),
                  pillow=Image.__version__, python=platform.python_version())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

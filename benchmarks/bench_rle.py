"""Benchmark: the segment stage's mask RLE (flows.segment.masks.encode_masks) against pycocotools.

The segment stage turns each batch's masks into COCO RLE in a thread of its own, beside the
thread that queues the next batch on the GPU. Two numbers per kind of mask, for one batch as
the stage sees it (8 images of 1024x768, 2 masks each, (H, W, K) Fortran-ordered uint8):

- ``*_ms``: the encoding's own time (counts string, box and area), ours and pycocotools'
  (``encode``, ``toBbox``, ``area``), best of ``--repeats``;
- ``*_launch_slowdown``: how much slower a thread issuing small torch ops (as the GPU thread
  queues kernels) runs while another thread encodes batches without pause, against the same
  ops alone. pycocotools holds the GIL for a whole call; numpy releases it inside its loops.
  ``control_launch_slowdown`` is the same beside a thread that only hashes (hashlib releases
  the GIL): the share of the slowdown that is CPU contention, not the GIL (large on a loaded
  2-core machine, near 1 on a many-core one).

Masks: ``random_sam`` are what a random-weights SAM gives (random 256x256 logits, upscaled
bilinear as SAM's post-processing does, thresholded at 0: ~100k runs per mask); ``smooth`` are
ellipses, like a trained SAM's masks.

    python benchmarks/bench_rle.py

Timings on a shared machine move with its load: compare within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from flows.segment.masks import encode_masks


def random_sam_masks(images: int, seed: int) -> list[np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(images * 2, 1, 256, 256, generator=gen)
    logits = F.interpolate(low, (1024, 1024), mode="bilinear", align_corners=False)[..., :768, :1024]
    masks = (logits[:, 0] > 0).numpy()  # (2n, H, W)
    return [np.asfortranarray(masks[2 * i:2 * i + 2].transpose(1, 2, 0).astype(np.uint8)) for i in range(images)]


def smooth_masks(images: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[:768, :1024]
    out = []
    for i in range(images):
        a = ((yy - 384) / (200 + 10 * i)) ** 2 + ((xx - 512) / (300 - 10 * i)) ** 2 < 1
        b = ((yy - 300) / 150) ** 2 + ((xx - 400 - 20 * i) / 120) ** 2 < 1
        out.append(np.asfortranarray(np.stack([a, b], axis=2).astype(np.uint8)))
    return out


def pycocotools_encode(masks: np.ndarray) -> None:
    rles = mask_utils.encode(masks)
    mask_utils.toBbox(rles)
    mask_utils.area(rles)


def best_ms(fn, batch: list[np.ndarray], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for masks in batch:
            fn(masks)
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 1)


def launch_seconds(ops: int) -> float:
    a, b = torch.zeros(4), torch.zeros(4)
    start = time.perf_counter()
    for _ in range(ops):
        torch.add(a, b)
    return time.perf_counter() - start


def launch_slowdown(fn, batch: list[np.ndarray], ops: int, repeats: int) -> float:
    alone = min(launch_seconds(ops) for _ in range(repeats))
    stop = threading.Event()

    def encode_forever():
        while not stop.is_set():
            for masks in batch:
                fn(masks)

    thread = threading.Thread(target=encode_forever)
    thread.start()
    try:
        time.sleep(0.1)
        beside = min(launch_seconds(ops) for _ in range(repeats))
    finally:
        stop.set()
        thread.join()
    return round(beside / alone, 2)


def hash_bytes(data: bytes) -> None:
    hashlib.sha256(data).digest()  # releases the GIL on large inputs: a control that only uses a CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch (2 masks each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ops", type=int, default=20_000, help="small torch ops timed for the slowdown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"images": args.images, "loadavg_before": os.getloadavg()[0]}
    result["control_launch_slowdown"] = launch_slowdown(hash_bytes, [bytes(8 << 20)] * 4, args.ops, 3)
    for name, batch in (("random_sam", random_sam_masks(args.images, args.seed)), ("smooth", smooth_masks(args.images))):
        for impl, fn in (("ours", encode_masks), ("pycocotools", pycocotools_encode)):
            result[f"{name}_{impl}_ms"] = best_ms(fn, batch, args.repeats)
            result[f"{name}_{impl}_launch_slowdown"] = launch_slowdown(fn, batch, args.ops, 3)
        result[f"{name}_time_ratio_ours_vs_pycocotools"] = round(
            result[f"{name}_ours_ms"] / result[f"{name}_pycocotools_ms"], 2)
    result["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

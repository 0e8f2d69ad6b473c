"""Benchmark: the ``embed`` stage end to end against the bare model, same batch size and dtype.

Generates ``--n-images`` JPEGs with a subject mask each (COCO RLE in a masks table, frames in
a frames table, as the filter and segment stages write them), then measures in one process:

- ``bare_img_s``: the stage's own forward (flows.embed.encode.encode_pixels: encode_image under
  inference_mode, bf16 autocast on CUDA, fp32 L2-normalise, fp16) on pre-made device tensors;
- ``stage_img_s``: flows.embed.stage.embed_frames on the generated files (read tables, join,
  DataLoader workers that decode, cut out and preprocess, forward, write Parquet), wall clock;
- ``preprocess_only_img_s``: the same DataLoader with no model, to show which side bounds.

``ratio`` = stage / bare (medians over ``--repeats``, measured interleaved). On a GPU the host
work overlaps the device's and the ratio should approach 1. On a CPU the workers and the model
share the same cores, so the best possible stage rate is ``cpu_shared_bound_img_s`` =
1 / (1/bare + 1/preprocess_only); ``overlap_efficiency`` = stage / that bound. Everywhere,
``stage_vs_slower_part`` = stage / min(bare, preprocess_only): 1 means the faster side is
completely hidden behind the slower one.

    python benchmarks/bench_embed.py --profile tiny --device cpu --batch 32 --n-images 512 --workers 2
    python benchmarks/bench_embed.py --profile vit-l-14-random --device cuda --batch 256 \
        --n-images 24576 --workers 14 --repeats 2

The stage's wall clock includes forking the workers and waiting for their first pieces of
a batch (flows.embed.stage.WORKER_ROWS rows each), so use enough images to amortise it, as a
real run does.
"""

from __future__ import annotations

import argparse
import io
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
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.config.params import EmbedParams, SourcesParams  # noqa: E402
from flows.embed.clip_model import TINY_MODEL, ClipSpec, load_clip  # noqa: E402
from flows.embed.encode import encode_pixels  # noqa: E402
from flows.embed.preprocess import SubjectDataset, make_loader, split_preprocess  # noqa: E402
from flows.embed.stage import FRAME_COLUMNS, MASK_COLUMNS, embed_frames, join_masks, read_columns  # noqa: E402
from flows.schemas import FRAMES, MASKS  # noqa: E402
from flows.tables import write_table  # noqa: E402

PROFILES = {
    "tiny": ClipSpec(TINY_MODEL, None),  # the stage's tiny profile (64 px)
    "vit-b-32-random": ClipSpec("ViT-B-32", None),  # 224 px, heavy enough to matter on a CPU
    "vit-l-14-random": ClipSpec("ViT-L-14", None),  # 224 px: DESIGN.md's H100 ceiling (~1,770 img/s bf16)
    "vit-h-14-random": ClipSpec("ViT-H-14", None),  # the sd15 profile's architecture
}
DISTINCT_IMAGES = 256  # distinct JPEGs; files beyond this repeat them under new names


def _photo(rng: np.random.Generator, width: int, height: int) -> tuple[bytes, np.ndarray]:
    """(JPEG bytes, (H, W) bool mask): a smooth colour field with a textured elliptic subject."""
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    image = np.asarray(base).astype(np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    bw, bh = int(width * rng.uniform(0.25, 0.6)), int(height * rng.uniform(0.3, 0.7))
    x0, y0 = int(rng.integers(0, width - bw)), int(rng.integers(0, height - bh))
    yy, xx = np.mgrid[0:height, 0:width]
    mask = ((xx - x0 - bw / 2) / (bw / 2)) ** 2 + ((yy - y0 - bh / 2) / (bh / 2)) ** 2 <= 1.0
    colour = rng.integers(0, 256, 3)
    image[mask] = (colour + 40 * np.sin(xx[mask, None] / 5.0 + yy[mask, None] / 7.0)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), mask


def generate(root: Path, n: int, width: int, height: int, seed: int = 0) -> tuple[Path, Path, SourcesParams]:
    """Frames and masks tables for ``n`` OpenImages-layout JPEGs under ``root``."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    bases = []
    for _ in range(min(n, DISTINCT_IMAGES)):
        data, mask = _photo(rng, width, height)
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        bases.append((data, rle, [float(v) for v in mask_utils.toBbox(rle)], float(mask.mean())))
    (root / "train").mkdir(parents=True, exist_ok=True)
    frames, masks = [], []
    for k in range(n):
        data, rle, (bx, by, bw, bh), area = bases[k % len(bases)]
        rel = f"train/{k:016x}.jpg"
        (root / rel).write_bytes(data)
        frame_id = f"openimages:{k:016x}/box"
        frames.append({
            "frame_id": frame_id, "source": "openimages", "subject_id": frame_id, "class_id": "/m/0", "class_name": "x",
            "image_path": rel, "width": width, "height": height, "frame_index": None, "pose_qvec": None,
            "pose_tvec": None, "box_xmin": bx / width, "box_ymin": by / height, "box_xmax": (bx + bw) / width,
            "box_ymax": (by + bh) / height, "mask_path": None, "content_hash": "0" * 64, "phash": 0,
            "blur_score": 100.0, "subject_area_frac": area, "mask_largest_cc_frac": 1.0, "is_group_of": False,
            "is_depiction": False, "is_occluded": False, "is_truncated": False})
        masks.append({"frame_id": frame_id, "subject_id": frame_id, "width": width, "height": height,
                      "rle_counts": rle["counts"], "bbox_x": bx, "bbox_y": by, "bbox_w": bw, "bbox_h": bh,
                      "area_frac": area, "quality": 1.0, "method": "provided", "model_id": None})
    write_table(root / "frames.parquet", FRAMES, frames)
    write_table(root / "masks.parquet", MASKS, masks)
    return root / "frames.parquet", root / "masks.parquet", SourcesParams(openimages_root=str(root))


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def bare_rate(clip, device, batch: int, n_images: int, min_seconds: float = 2.0) -> float:
    """img/s of the stage's forward on pre-made tensors already on the device.

    Runs at least ``n_images`` and ``min_seconds``. On a CPU it is the better of all cores'
    threads and one thread: on a shared machine, OpenMP threads that outnumber the free
    cores spin, and the baseline should be the best the bare model can do.
    """
    import torch

    pixels = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device)
    thread_counts = [torch.get_num_threads()] + ([1] if device.type == "cpu" and torch.get_num_threads() > 1 else [])
    rates = []
    for threads in thread_counts:
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            _sync(device)
            done, start = 0, time.perf_counter()
            while done < n_images or time.perf_counter() - start < min_seconds:
                out = encode_pixels(clip.model, pixels)
                done += batch
            out.cpu()
            _sync(device)
            rates.append(done / (time.perf_counter() - start))
        finally:
            torch.set_num_threads(default)
    return max(rates)


def preprocess_rate(frames: Path, masks: Path, sources: SourcesParams, clip, params: EmbedParams, pin: bool) -> float:
    """img/s of the stage's DataLoader alone (workers decode, cut out, preprocess; no model)."""
    work, _ = join_masks(read_columns(frames, FRAMES, FRAME_COLUMNS), read_columns(masks, MASKS, MASK_COLUMNS), sources)
    dataset = SubjectDataset(work, preprocess=split_preprocess(clip.preprocess).host, image_size=clip.image_size,
                             background=params.background_rgb)
    start = time.perf_counter()
    count = sum(len(batch[0]) for batch in make_loader(dataset, batch_size=params.batch_size,
                                                       num_workers=params.num_workers, pin_memory=pin))
    return count / (time.perf_counter() - start)


def stage_rate(frames: Path, masks: Path, sources: SourcesParams, clip, params: EmbedParams,
               device) -> tuple[float, dict]:
    """img/s of embed_frames, wall clock, everything included but loading the model; and where the
    rest went: seconds outside the encoding loop (reading and joining the inputs, the work key,
    closing the output tables and stats; and the two sides apart), seconds to the first batch (workers, first pieces), and
    the stage's rate from its first batch to the last before the drain (timing.json's steady_img_s)."""
    out = Path(params.out_dir)
    start = time.perf_counter()
    stats = embed_frames(frames, masks, out, params, sources, device=str(device), clip=clip)
    seconds = time.perf_counter() - start
    assert stats["count"] == len(read_columns(frames, FRAMES, ["frame_id"])), stats
    return stats["count"] / seconds, {"outside_loop_s": seconds - stats["seconds"],
                                      "setup_s": stats.get("setup_s"), "outputs_s": stats.get("outputs_s"),
                                      "first_batch_s": stats.get("first_batch_s"),
                                      "steady_img_s": stats.get("steady_img_s")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n-images", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-width", type=int, default=512)
    parser.add_argument("--image-height", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved bare/stage measurements; medians reported")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir, deleted afterwards")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        t0 = time.perf_counter()
        frames, masks, sources = generate(root / "in", args.n_images, args.image_width, args.image_height)
        generate_s = time.perf_counter() - t0
        clip = load_clip(PROFILES[args.profile], device=device)
        params = EmbedParams(out_dir=str(root / "out"), batch_size=args.batch, num_workers=args.workers)
        bare_rate(clip, device, args.batch, 4 * args.batch, min_seconds=0.0)  # warm-up: kernels, allocator
        prep = preprocess_rate(frames, masks, sources, clip, params, pin=device.type == "cuda")
        bare, stage, parts = [], [], []
        print(f"# preprocess only: {prep:.1f} img/s", file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            bare.append(bare_rate(clip, device, args.batch, args.n_images))
            rate, where = stage_rate(frames, masks, sources, clip, params, device)
            stage.append(rate)
            parts.append(where)
            print(f"# bare {bare[-1]:.1f} img/s, stage {stage[-1]:.1f} img/s ({where})", file=sys.stderr, flush=True)
        steady = [p["steady_img_s"] for p in parts if p["steady_img_s"]]
        bare_m, stage_m = statistics.median(bare), statistics.median(stage)
        result = {
            "profile": args.profile, "model_id": clip.model_id, "image_size": clip.image_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
            "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
            "batch": args.batch, "workers": args.workers, "n_images": args.n_images,
            "jpeg_size": f"{args.image_width}x{args.image_height}", "repeats": args.repeats,
            "bare_img_s": round(bare_m, 1), "stage_img_s": round(stage_m, 1), "ratio": round(stage_m / bare_m, 3),
            "preprocess_only_img_s": round(prep, 1),
            "bare_img_s_all": [round(v, 1) for v in bare], "stage_img_s_all": [round(v, 1) for v in stage],
            "stage_outside_loop_s_all": [round(p["outside_loop_s"], 2) for p in parts],
            # its two sides: before the loop (inputs, work key) and after it (closing the outputs, stats)
            "stage_setup_s_all": [p["setup_s"] for p in parts],
            "stage_outputs_s_all": [p["outputs_s"] for p in parts],
            "stage_first_batch_s_all": [p["first_batch_s"] for p in parts],
            "stage_steady_img_s_all": steady,
            # the rate once running (first to last batch) against the bare forward: what a long run sees
            "steady_ratio": round(statistics.median(steady) / bare_m, 3) if steady else None,
            "generate_s": round(generate_s, 1), "torch": torch.__version__, "python": platform.python_version(),
        }
        if device.type == "cpu":
            bound = 1.0 / (1.0 / bare_m + 1.0 / prep)
            result["cpu_shared_bound_img_s"] = round(bound, 1)
            result["overlap_efficiency"] = round(stage_m / bound, 3)
        result["stage_vs_slower_part"] = round(stage_m / min(bare_m, prep), 3)
        print(json.dumps(result, indent=2))
        return result
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

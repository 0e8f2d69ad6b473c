"""Benchmark: the segment stage's end-to-end throughput against the bare SAM image encoder.

Both are measured in one run, on one device, at the same batch size and dtype (bf16 autocast
on CUDA, float32 on CPU):

- ``encoder``: ``image_encoder`` forward on pre-made, already normalised tensors on the device;
- ``stage``: ``flows.segment.stage.segment_frames`` on generated OpenImages-layout JPEGs with
  ``--boxes`` boxes per image and no masks, so every frame goes through SAM: Parquet in,
  JPEG decode, resize, encoder, batched decoder, upscaling, RLE, Parquet out.

The model is built and warmed up before timing. The issue's target: stage >= 0.9 x encoder.

    python benchmarks/bench_segment.py --profile tiny --device cpu --batch 4 --n-images 32
    python benchmarks/bench_segment.py --profile vit_h-random --device cuda --batch 8 --n-images 256
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.config.params import SegmentParams, SourcesParams  # noqa: E402
from flows.schemas import FRAMES, REJECTS  # noqa: E402
from flows.segment import stage  # noqa: E402
from flows.segment.sam_infer import SamRunner  # noqa: E402
from flows.segment.sam_model import SPECS, LoadedSam, build_sam  # noqa: E402
from flows.tables import write_table  # noqa: E402

PROFILES = {"tiny": "tiny", "vit_h-random": "vit_h"}


def build_model(profile: str, device: torch.device) -> LoadedSam:
    """Random weights, initialised directly on the device (ViT-H on CPU takes a while)."""
    spec = SPECS[PROFILES[profile]]
    torch.manual_seed(0)
    with device:
        model = build_sam(spec)
    return LoadedSam(model, spec, f"sam:{spec.name}:random-seed0", random_weights=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_encoder(runner: SamRunner, batch: int, n_images: int, warmup: int = 2) -> float:
    """Images/s of the bare image encoder on pre-made device tensors.

    The input comes from the stage's own ``SamRunner.preprocess`` (random pixels), so it has the
    memory layout the stage feeds the encoder (channels-last, from the HWC upload).
    """
    s = runner.image_size
    rng = np.random.default_rng(0)
    x = runner.preprocess([rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(batch)])
    steps = max(1, n_images // batch)
    with torch.inference_mode(), runner.autocast():
        for _ in range(warmup):
            runner.model.image_encoder(x)
        _sync(runner.device)
        start = time.perf_counter()
        for _ in range(steps):
            runner.model.image_encoder(x)
        _sync(runner.device)
    return steps * batch / (time.perf_counter() - start)


def _jpeg(rng: np.random.Generator, width: int, height: int, boxes: list) -> bytes:
    """A smooth photo-like background with a flat-coloured ellipse in each box."""
    base = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(base).resize((width, height), Image.BICUBIC)).copy()
    yy, xx = np.mgrid[0:height, 0:width]
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height, (x1 - x0) / 2 * width, (y1 - y0) / 2 * height
        image[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = rng.integers(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(root: Path, n_images: int, boxes_per_image: int, width: int, height: int) -> None:
    """OpenImages-layout JPEGs and a filter-stage frames.parquet with only boxes (no masks).

    The rows carry identity poses, not the nulls real OpenImages rows have: pyarrow 25.0.1 (on
    the GPU machines) cannot read back null fixed-size lists it wrote; the stage ignores poses.
    """
    rng = np.random.default_rng(0)
    (root / "openimages" / "train").mkdir(parents=True)
    rows = []
    for i in range(n_images):
        image_id = f"{i:08x}"
        boxes = []
        for _ in range(boxes_per_image):
            x0, y0 = rng.uniform(0.0, 0.5, 2)
            boxes.append((x0, y0, x0 + rng.uniform(0.2, 0.5), y0 + rng.uniform(0.2, 0.5)))
        (root / "openimages" / "train" / f"{image_id}.jpg").write_bytes(_jpeg(rng, width, height, boxes))
        for b, (x0, y0, x1, y1) in enumerate(boxes):
            rows.append({
                "frame_id": f"openimages:{image_id}/{b:012x}", "source": "openimages",
                "subject_id": f"openimages:{image_id}/{b:012x}", "class_id": "/m/0", "class_name": "thing",
                "image_path": f"train/{image_id}.jpg", "width": width, "height": height, "frame_index": None,
                "pose_qvec": [1.0, 0.0, 0.0, 0.0], "pose_tvec": [0.0, 0.0, 0.0],
                "box_xmin": x0, "box_ymin": y0, "box_xmax": x1, "box_ymax": y1, "mask_path": None, "content_hash": "0" * 64, "phash": 0, "blur_score": 100.0,
                "subject_area_frac": (x1 - x0) * (y1 - y0), "mask_largest_cc_frac": None, "is_group_of": False,
                "is_depiction": False, "is_occluded": False, "is_truncated": False,
            })
    write_table(root / "filter" / "frames.parquet", FRAMES, rows)
    write_table(root / "filter" / "rejects.parquet", REJECTS, [])


class Timeline:
    """Where a stage run's time goes, batch by batch: marks in ``SamRunner.launch``.

    Per batch: when launch is called, when the encoder's input is on the device (upload and
    normalisation done), when the encoder is done, and when the decoder and post-processing are.
    On CUDA the marks are events on the stream: a mark's time is when the device reached it. So
    ``encoder_only_s`` is device time, and ``to_encoder_input_s`` (from the previous batch's end
    to this batch's input) is the upload and normalisation plus any time the device waited for
    the host, which builds the pinned batch after the launch mark. On CPU the marks are host
    clock readings (everything is synchronous).
    """

    def __init__(self, runner: SamRunner):
        self.runner, self.cuda = runner, runner.device.type == "cuda"
        self.batches: list[list] = []  # per batch: [launch called, input ready, encoder done, launch done]
        self.first_launch = self.last_return = None
        self._embed, self._launch, self._preprocess = runner.embed, runner.launch, runner.preprocess
        # instance attributes shadow the methods
        runner.embed, runner.launch, runner.preprocess = self.embed, self.launch, self.preprocess

    def close(self) -> None:
        del self.runner.embed, self.runner.launch, self.runner.preprocess

    def preprocess(self, resized):
        out = self._preprocess(resized)
        self.batches[-1].append(self._mark())
        return out

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def embed(self, resized):
        out = self._embed(resized)
        self.batches[-1].append(self._mark())
        return out

    def launch(self, images):
        self.first_launch = self.first_launch or time.perf_counter()
        self.batches.append([self._mark()])
        pending = self._launch(images)
        self.batches[-1].append(self._mark())
        self.last_return = time.perf_counter()
        return pending

    def summary(self, start: float, end: float) -> dict:
        _sync(self.runner.device)
        b = self.batches
        return {
            "batches": len(b),
            "encoder_only_s": round(sum(self._seconds(m[1], m[2]) for m in b), 3),
            "to_encoder_input_s": round(self._seconds(b[0][0], b[0][1])
                                        + sum(self._seconds(p[3], m[1]) for p, m in zip(b, b[1:])), 3),
            "decoder_and_post_s": round(sum(self._seconds(m[2], m[3]) for m in b), 3),
            "host_before_first_launch_s": round(self.first_launch - start, 3),
            "host_after_last_launch_s": round(end - self.last_return, 3),
            # per batch, to tell a start-up cost from a per-batch one
            "to_encoder_input_ms_per_batch": [round(1000 * self._seconds(b[0][0], b[0][1]), 1)]
            + [round(1000 * self._seconds(p[3], m[1]), 1) for p, m in zip(b, b[1:])],
            "encoder_ms_per_batch": [round(1000 * self._seconds(m[1], m[2]), 1) for m in b],
        }


def bench_stage(runner: SamRunner, root: Path, batch: int, workers: int | None,
                timeline: Timeline | None = None) -> tuple[float, dict]:
    """Seconds of one whole stage run over the data in ``root``, and its stats (with ``timeline``'s summary)."""
    sources = SourcesParams(openimages_root=str(root / "openimages"))
    params = SegmentParams(out_dir=str(root / "segment"), batch_images=batch, frames_per_shard=1_000_000)
    _sync(runner.device)
    start = time.perf_counter()
    stats = stage.segment_frames(root / "filter", root / "segment", sources=sources, params=params,
                                 runner=lambda: runner, workers=workers)
    _sync(runner.device)
    end = time.perf_counter()
    if timeline is not None:
        stats = {**stats, "timeline": timeline.summary(start, end)}
    return end - start, stats


def pycocotools_encode_masks(masks):
    """flows.segment.masks.encode_masks as it was: pycocotools' encode, toBbox and area."""
    from pycocotools import mask as mask_utils

    height, width, _ = masks.shape
    rles = mask_utils.encode(np.asfortranarray(masks, dtype=np.uint8))
    return [{"rle_counts": rle["counts"], "bbox_x": float(box[0]), "bbox_y": float(box[1]), "bbox_w": float(box[2]),
             "bbox_h": float(box[3]), "area_frac": float(area) / (height * width)}
            for rle, box, area in zip(rles, mask_utils.toBbox(rles), mask_utils.area(rles))]


def compare_rle(runner: SamRunner, root: Path, batch: int, workers: int | None) -> tuple[float, dict]:
    """The stage again on the same data, its RLE done by pycocotools (which holds the GIL per call)."""
    shutil.rmtree(root / "segment", ignore_errors=True)
    ours, stage.encode_masks = stage.encode_masks, pycocotools_encode_masks
    timeline = Timeline(runner)
    try:
        return bench_stage(runner, root, batch, workers, timeline)
    finally:
        timeline.close()
        stage.encode_masks = ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="images per encoder batch (segment.batch_images)")
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=2, help="boxes (frames) per image")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="generated image size; default: the encoder input's long side, 4:3")
    parser.add_argument("--workers", type=int, default=None, help="loader threads (default: min(8, cores))")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--compare-rle", action="store_true",
                        help="also run the stage with pycocotools' RLE (encode, toBbox, area) in place of "
                             "flows.segment.masks.encode_masks, right after the first run (on warm caches, "
                             "which if anything favours pycocotools)")
    args = parser.parse_args()

    device = torch.device(args.device)
    runner = SamRunner(build_model(args.profile, device), device)
    side = runner.image_size
    width, height = args.size or (side, side * 3 // 4)
    root = Path(tempfile.mkdtemp(prefix="bench-segment-"))
    try:
        generate(root / "warm", min(args.n_images, 2 * args.batch), args.boxes, width, height)
        generate(root / "run", args.n_images, args.boxes, width, height)
        bench_stage(runner, root / "warm", args.batch, args.workers)  # warm-up: kernels, allocator, threads
        encoder_before = bench_encoder(runner, args.batch, args.n_images)
        print(f"# encoder before: {encoder_before:.3f} img/s", file=sys.stderr, flush=True)
        timeline = Timeline(runner)
        try:
            seconds, stats = bench_stage(runner, root / "run", args.batch, args.workers, timeline)
        finally:
            timeline.close()
        print(f"# stage: {args.n_images / seconds:.3f} img/s", file=sys.stderr, flush=True)
        compared = compare_rle(runner, root / "run", args.batch, args.workers) if args.compare_rle else None
        encoder_after = bench_encoder(runner, args.batch, args.n_images)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    encoder = (encoder_before + encoder_after) / 2
    stage_rate = args.n_images / seconds
    print(json.dumps({
        "profile": args.profile, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": "bf16-autocast" if device.type == "cuda" else "float32", "batch": args.batch,
        "n_images": args.n_images, "boxes_per_image": args.boxes, "image_size": [width, height],
        "encoder_input": side, "torch_threads": torch.get_num_threads(),
        "encoder_images_per_s": round(encoder, 3),
        "encoder_images_per_s_before_after": [round(encoder_before, 3), round(encoder_after, 3)],
        "stage_images_per_s": round(stage_rate, 3), "stage_frames_per_s": round(stage_rate * args.boxes, 3),
        "ratio": round(stage_rate / encoder, 3),
        "stage_seconds": round(seconds, 3), "timeline": stats["timeline"],
        "stage_stats": {k: stats[k] for k in ("input_frames", "masks", "rejected", "methods")},
        **({} if compared is None else {
            "pycocotools_rle_stage_images_per_s": round(args.n_images / compared[0], 3),
            "pycocotools_rle_ratio": round(args.n_images / compared[0] / encoder, 3),
            "pycocotools_rle_timeline": compared[1]["timeline"]}),
    }, indent=2))


if __name__ == "__main__":
    main()

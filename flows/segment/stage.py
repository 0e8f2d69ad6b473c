"""The ``segment`` stage as plain functions: plan shards, segment each shard, merge.

Every input frame ends in exactly one place: a masks row or a segment rejects row, both in
input order. SAM runs only for shards that need it; images are decoded by loader threads a
few batches ahead of the GPU, and the RLEs of one batch are encoded while the next computes.
The shards live in a resumable work folder (flows.resume): a run that fails keeps its
finished shards, and the next run with the same inputs, parameters and code segments only
the rest.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from flows import ids, reasons
from flows.accounting import AccountingError
from flows.config.params import FilterParams, SegmentParams, SourcesParams
from flows.filtering.rules import Failure, box_shape, mask_connected, subject_area
from flows.probe import measure_mask
from flows.resume import ResumableWork, device_identity, file_identity, library_versions, work_key
from flows.schemas import FRAMES, MASKS, REJECTS
from flows.segment.masks import encode_mask, encode_masks
from flows.segment.sam_infer import ImageMasks, PendingBatch, SamRunner
from flows.segment.sam_model import sam_for_params
from flows.segment.work import (PROVIDED, SAM_BOX, SAM_REFINED, STAGE, LoadedGroup, frame_reject,
                                group_by_image, load_group, mask_row, provided_result)
from flows.tables import (TableWriter, concat_tables, count_rows, iter_batches, iter_rows, open_table,
                          write_json_atomic)

PREFETCH_BATCHES = 2  # image batches decoded ahead of the one being queued on the device
MAX_BATCHES_IN_FLIGHT = 2  # batches queued on the device whose rows are not yet built
# The filter rules that look at the subject mask; refine's SAM mask must pass them too (see sam_mask_failure).
MASK_RULES = (subject_area, box_shape, mask_connected)


@dataclass(frozen=True)
class ShardOutput:
    """The two Parquet parts one shard writes (paths, so tasks pass no data)."""

    masks: Path
    rejects: Path


def default_device() -> str:
    """The GPU when one is present."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def open_shards(filter_dir: Path, out_dir: Path, *, sources: SourcesParams, filtering: FilterParams,
                params: SegmentParams, device: str, device_id: str | None = None) -> tuple[ResumableWork, list[Path]]:
    """The work folder (out_dir/.work) and its shards: planned now, or kept from a failed run of the same key.

    The key (flows.resume) holds what decides a shard's bytes: the frames table, the params,
    the device type (bf16 autocast on CUDA, float32 elsewhere; on CUDA its library versions), the
    libraries, the checkpoint. ``device_id``: that device as :func:`worker_device_id` gave it
    where SAM runs (a cluster's workers), instead of ``device`` here.
    """
    frames = filter_dir / "frames.parquet"
    key = work_key(inputs=[frames], code=["segment", "probe.py", "filtering/rules.py"], params={
        "sources": sources, "filter": filtering, "segment": params, "device": device_id or device_identity(torch.device(device)),
        "versions": library_versions("torch", "segment-anything", "pillow", "numpy", "pycocotools",
                                     "opencv-python-headless"),
        "checkpoint": file_identity(params.sam_checkpoint) if params.sam_profile == "sam" else None})
    work = ResumableWork(out_dir / ".work", key)
    work.open()
    plan = work.done("plan")
    if plan is None:
        shards = plan_shards(frames, work.folder, frames_per_shard=params.frames_per_shard)
        work.mark_done("plan", {"shards": [shard.name for shard in shards]}, files=shards)
        return work, shards
    return work, [work.folder / name for name in plan["shards"]]


def mark_shard_done(work: ResumableWork, shard: Path, counters: dict[str, int], model: dict[str, Any] | None) -> dict:
    """Record a segmented shard (after both its parts are written); returns the record."""
    record = {"counters": counters, "model": model}
    out = shard_output(shard)
    work.mark_done(shard.name, record, files=[out.masks, out.rejects])
    return record


def needs_sam(frames: Path, params: SegmentParams) -> bool:
    """Whether SAM will run: refine mode, or some frame without a provided mask (False if no frames table yet)."""
    if params.mode == "refine":
        return True
    if not frames.is_file():
        return False  # the flow then fails on the missing table, in one line (work_key)
    file = open_table(frames, FRAMES)
    column = file.schema_arrow.get_field_index("mask_path")
    for group in range(file.metadata.num_row_groups):  # the row groups' statistics: no column read
        stats = file.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_null_count:
            return file.read(columns=["mask_path"]).column("mask_path").null_count > 0
        if stats.null_count > 0:
            return True
    return False


def shard_output(shard: Path) -> ShardOutput:
    return ShardOutput(shard.with_suffix(".masks.parquet"), shard.with_suffix(".rejects.parquet"))


def plan_shards(frames: Path, work_dir: Path, *, frames_per_shard: int) -> list[Path]:
    """Split the frames table into shard files of about ``frames_per_shard`` rows, in order.

    A shard only ends between two images, so the boxes of one image (consecutive in ingest's
    output) stay in one shard and its image is encoded once.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    writer: TableWriter | None = None
    previous_image, in_shard = None, 0
    for row in iter_rows(frames, FRAMES):
        image = (row["source"], row["image_path"])
        if writer is None or (in_shard >= frames_per_shard and image != previous_image):
            if writer is not None:
                writer.close()
            shards.append(work_dir / f"shard-{len(shards):05d}.parquet")
            writer, in_shard = TableWriter(shards[-1], FRAMES), 0
        writer.write_row(row)
        previous_image, in_shard = image, in_shard + 1
    if writer is not None:
        writer.close()
    return shards


def segment_shard(shard: Path, out: ShardOutput, *, sources: SourcesParams, params: SegmentParams,
                  filtering: FilterParams, runner: Callable[[], SamRunner],
                  workers: int | None = None) -> dict[str, int]:
    """Segment one shard; write its masks and rejects parts in input order; return counters.

    ``runner`` is called only if some frame needs SAM (so provided-only shards load no model).
    ``filtering``: the filter stage's thresholds, which a refine mask must pass to replace a provided one.
    """
    rows = list(iter_rows(shard, FRAMES))
    results: list[dict[str, Any] | None] = [None] * len(rows)
    counters: Counter[str] = Counter()
    refine = params.mode == "refine"
    provided_only, groups = group_by_image(rows, refine=refine, sources=sources)
    with ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="segment-load") as pool:
        provided = pool.map(partial(provided_result, sources=sources), [rows[i] for i in provided_only])
        for position, result in zip(provided_only, provided):
            results[position] = result
        if groups:
            sam = runner()
            loads = (partial(load_group, group, sources, sam.resize) for group in groups)
            # One thread turns finished batches into rows (RLE) while this one queues the next
            # batch on the device; it spends its waits on the GPU with the GIL released.
            with ThreadPoolExecutor(1, thread_name_prefix="segment-rle") as rle:
                inflight: deque = deque()
                for batch, ready, pending in _launch_batches(sam, loads, pool, params.batch_images):
                    inflight.append(rle.submit(_collect_batch, batch, ready, pending, results, params,
                                               filtering, sam.model_id, counters))
                    while len(inflight) > MAX_BATCHES_IN_FLIGHT:
                        inflight.popleft().result()
                for done in inflight:
                    done.result()
    with TableWriter(out.masks, MASKS) as masks_out, TableWriter(out.rejects, REJECTS) as rejects_out:
        for frame, result in zip(rows, results):
            if result is None:  # every path above fills its frames; this is a bug
                raise AccountingError(f"{frame['frame_id']}: no mask and no reject")
            if "mask" in result:
                masks_out.write_row(result["mask"])
                counters[result["mask"]["method"]] += 1
            else:
                rejects_out.write_row(result["reject"])
                counters["rejected"] += 1
    return dict(counters)


def _launch_batches(sam: SamRunner, loads: Iterator[Callable[[], LoadedGroup]], pool: ThreadPoolExecutor,
                    batch_images: int) -> Iterator[tuple[list[LoadedGroup], list[LoadedGroup], PendingBatch | None]]:
    """Queue batches of decoded images on the device, in order; the loads run ahead in ``pool``.

    Yields (batch, its groups with prompts, the queued SAM work or None if none had prompts).
    """
    window: deque = deque()

    def fill() -> None:
        while len(window) < (PREFETCH_BATCHES + 1) * batch_images:
            load = next(loads, None)
            if load is None:
                return
            window.append(pool.submit(load))

    while True:
        fill()
        batch = [window.popleft().result() for _ in range(min(batch_images, len(window)))]
        if not batch:
            return
        fill()
        ready = [g for g in batch if g.prompts is not None]
        yield batch, ready, (sam.launch([g.prompts for g in ready]) if ready else None)


def _collect_batch(batch: list[LoadedGroup], ready: list[LoadedGroup], pending: PendingBatch | None,
                   results: list, params: SegmentParams, filtering: FilterParams, model_id: str,
                   counters: Counter) -> None:
    answers = dict(zip(map(id, ready), pending.result())) if pending is not None else {}
    for group in batch:
        _collect(group, answers.get(id(group)), results, params, filtering, model_id, counters)


def _collect(loaded: LoadedGroup, masks: ImageMasks | None, results: list, params: SegmentParams,
             filtering: FilterParams, model_id: str, counters: Counter) -> None:
    """Turn SAM's answer for one image into masks or rejects rows at the frames' positions."""
    for position, row in loaded.rejects.items():
        results[position] = {"reject": row}
    if masks is None:
        return
    frames = dict(loaded.group.frames)
    height, width = loaded.prompts.original_size
    rles = encode_masks(masks.masks)
    for k, position in enumerate(loaded.positions):
        frame, rle, stability = frames[position], rles[k], float(masks.stability[k])
        provided = loaded.provided[k]
        if provided is None:
            if rle["area_frac"] == 0:
                results[position] = {"reject": frame_reject(
                    frame, reasons.EMPTY_MASK, f"SAM ({model_id}) found no subject pixel in the box")}
            else:
                results[position] = {"mask": mask_row(frame, rle, width=width, height=height, quality=stability,
                                                      method=SAM_BOX, model_id=model_id)}
            continue
        # Refine: the provided mask scores SAM's stability when SAM is prompted with it (box + mask);
        # SAM's own box mask replaces it only if more stable by refine_min_gain (see refine_decision)
        # and if it passes the filter's mask rules, as the provided mask did (see sam_mask_failure).
        counters["refine_compared"] += 1
        replace = refine_decision(sam_stability=stability, provided_score=float(masks.prompted_stability[k]),
                                  sam_area=rle["area_frac"], min_gain=params.refine_min_gain)
        if replace and sam_mask_failure(frame, masks.masks[:, :, k], filtering) is not None:
            counters["refine_rejected_by_filters"] += 1
            replace = False
        if replace:
            counters["refine_replaced"] += 1
            results[position] = {"mask": mask_row(frame, rle, width=width, height=height, quality=stability,
                                                  method=SAM_REFINED, model_id=model_id)}
        else:
            results[position] = {"mask": mask_row(frame, encode_mask(provided), width=width, height=height,
                                                  quality=1.0, method=PROVIDED, model_id=None)}


def refine_decision(*, sam_stability: float, provided_score: float, sam_area: float, min_gain: float) -> bool:
    """True when SAM's box mask should replace the provided mask.

    Both numbers are SAM stability scores (IoU of the mask at logit thresholds +1 and -1) by
    the same model on the same image: ``sam_stability`` for SAM prompted with the box alone,
    ``provided_score`` for SAM prompted with the box plus the provided mask as a mask prompt.
    A provided mask that agrees with a well-defined segment lets SAM answer as stably as from
    the box, and is kept; one that points SAM at an ill-defined region lowers the stability.
    Ties and near-ties keep the data set's own mask (``min_gain`` > 0), as does an empty SAM mask.
    """
    if sam_area == 0 or math.isnan(provided_score):
        return False
    return sam_stability >= provided_score + min_gain


def sam_mask_failure(frame: dict[str, Any], mask: np.ndarray, filtering: FilterParams) -> Failure:
    """The first filter mask rule that ``frame`` fails with ``mask`` as its subject mask, or None.

    The filter stage judged the provided mask through the frames row's mask measurements
    (``subject_area_frac``, ``mask_largest_cc_frac`` and, for MVImgNet, whose box ingest takes
    from the mask, the box). Here they are measured on ``mask`` (a (H, W) array at image size)
    the way ingest measures a mask file (flows.probe.measure_mask), put in place of the frame's,
    and judged by the filter's own rules (MASK_RULES) and thresholds: whichever of those
    measurements a rule reads for the frame's source is what the SAM mask must pass.
    """
    probe = measure_mask(mask)
    row = {**frame, "subject_area_frac": probe.area_frac, "mask_largest_cc_frac": probe.largest_cc_frac}
    if frame["source"] == ids.MVIMGNET:
        row.update(zip(("box_xmin", "box_ymin", "box_xmax", "box_ymax"), probe.box))
    for rule in MASK_RULES:
        failure = rule(row, filtering)
        if failure is not None:
            return failure
    return None


def merge_outputs(mask_parts: list[Path], reject_parts: list[Path], *, filter_dir: Path, out_dir: Path,
                  counters: dict[str, int], model: dict[str, Any] | None) -> dict[str, Any]:
    """Concatenate the parts (input order); the rejects table also carries the earlier stages'."""
    masks_path, rejects_path = out_dir / "masks.parquet", out_dir / "rejects.parquet"
    concat_tables(mask_parts, masks_path, MASKS)
    concat_tables([filter_dir / "rejects.parquet", *reject_parts], rejects_path, REJECTS)
    stats = segment_stats(filter_dir / "frames.parquet", masks_path, rejects_path, counters=counters, model=model)
    write_json_atomic(out_dir / "stats.json", stats)
    return stats


def segment_stats(frames: Path, masks: Path, rejects: Path, *, counters: dict[str, int],
                  model: dict[str, Any] | None) -> dict[str, Any]:
    """Counts per method, quality, rejects per reason; raises if frames != masks + rejects."""
    methods: Counter[str] = Counter()
    quality: dict[str, float] = {}
    for batch in iter_batches(masks, MASKS, columns=["method", "quality"]):
        for method in set(batch.column("method").to_pylist()):
            chosen = pc.filter(batch.column("quality"), pc.equal(batch.column("method"), method))
            methods[method] += len(chosen)
            quality[method] = quality.get(method, 0.0) + pc.sum(chosen).as_py()
    reasons_seen: Counter[str] = Counter()
    for batch in iter_batches(rejects, REJECTS, columns=["stage", "reason"]):
        for row in batch.to_pylist():
            if row["stage"] == STAGE:
                reasons_seen[row["reason"]] += 1
    n_in, n_masks, n_rejected = count_rows(frames), sum(methods.values()), sum(reasons_seen.values())
    if n_in != n_masks + n_rejected:
        raise AccountingError(f"{n_in} input frames != {n_masks} masks + {n_rejected} segment rejects")
    return {
        "input_frames": n_in, "masks": n_masks, "rejected": n_rejected,
        "methods": {m: methods.get(m, 0) for m in (PROVIDED, SAM_BOX, SAM_REFINED)},
        "mean_quality": (sum(quality.values()) / n_masks) if n_masks else None,
        "mean_quality_by_method": {m: quality[m] / methods[m] for m in sorted(methods)},
        "reasons": dict(sorted(reasons_seen.items())),
        "refine": {"compared": counters.get("refine_compared", 0), "replaced": counters.get("refine_replaced", 0),
                   # more stable than the provided mask, but failed the filter's mask rules: provided kept
                   "rejected_by_filters": counters.get("refine_rejected_by_filters", 0)},
        "sam": model,
    }


def model_summary(sam: SamRunner | None) -> dict[str, Any] | None:
    """What stats.json records about the SAM model used, None if no frame needed one."""
    if sam is None:
        return None
    return {"model_id": sam.model_id, "random_weights": sam.random_weights, "device": str(sam.device)}


class LazyRunner:
    """Builds the SAM runner on first call and keeps it (one model per process and params)."""

    def __init__(self, params: SegmentParams, device: str):
        self.params, self.device = params, device
        self.runner: SamRunner | None = None

    def __call__(self) -> SamRunner:
        if self.runner is None:
            self.runner = SamRunner(sam_for_params(self.params), self.device)
        return self.runner


@dataclass(frozen=True)
class ShardJob:
    """One shard's work as it travels to a Dask worker (flows.cluster): absolute paths, plain params."""

    shard: Path
    sources: SourcesParams
    params: SegmentParams
    filtering: FilterParams


_WORKER_LOCK = threading.Lock()  # one segment shard at a time per process: one SAM, one device
_worker_runner: tuple[tuple, LazyRunner] | None = None  # this process's SAM, and what it was built from


def worker_device_id() -> str:
    """The device this process would run SAM on, as resume keys name it (asked of every cluster worker)."""
    return device_identity(torch.device(default_device()))


def _runner_for(params: SegmentParams, device: str) -> LazyRunner:
    """This process's SAM for ``params``: the one built for an earlier shard if it is the same model
    (profile, architecture, checkpoint file by path, size and mtime), else a new one in its place."""
    global _worker_runner
    model = (params.sam_profile, params.sam_model_type, device,
             file_identity(params.sam_checkpoint) if params.sam_profile == "sam" else None)
    if _worker_runner is None or _worker_runner[0] != model:
        _worker_runner = None  # drop the old model before the new one loads
        _worker_runner = (model, LazyRunner(params, device))
    return _worker_runner[1]


def segment_shard_job(job: ShardJob) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Segment ``job``'s shard in this process (a Dask worker) on its device; return (counters, model).

    The worker keeps its SAM between shards, as the stage's own process does, and runs one shard
    at a time whatever its thread count. The model is reported only if this shard used it.
    """
    with _WORKER_LOCK:
        runner = _runner_for(job.params, default_device())
        used: list[SamRunner] = []

        def tracked() -> SamRunner:
            used.append(runner())
            return used[-1]

        counters = segment_shard(job.shard, shard_output(job.shard), sources=job.sources, params=job.params,
                                 filtering=job.filtering, runner=tracked)
        return counters, model_summary(used[0]) if used else None


def segment_frames(filter_dir: Path, out_dir: Path, *, sources: SourcesParams, params: SegmentParams,
                   runner: Callable[[], SamRunner], filtering: FilterParams | None = None,
                   workers: int | None = None, device: str | None = None) -> dict[str, Any]:
    """The whole stage without Prefect (what the flow does task by task): for tests and benchmarks.

    ``filtering``: the filter stage's thresholds (refine mode); None takes FilterParams' defaults.
    ``device``: where ``runner`` runs SAM (default: default_device()), part of the resume key.
    """
    filtering = filtering if filtering is not None else FilterParams()
    work, shards = open_shards(filter_dir, out_dir, sources=sources, filtering=filtering, params=params,
                               device=device or default_device())
    counters, models, used = Counter(), [], []

    def tracked() -> SamRunner:
        used.append(runner())
        return used[-1]

    for shard in shards:
        record = work.done(shard.name)
        if record is None:
            shard_counters = segment_shard(shard, shard_output(shard), sources=sources, params=params,
                                           filtering=filtering, runner=tracked, workers=workers)
            record = mark_shard_done(work, shard, shard_counters, model_summary(used[0]) if used else None)
        counters.update(record["counters"])
        models.append(record["model"])
    stats = merge_outputs([shard_output(s).masks for s in shards], [shard_output(s).rejects for s in shards],
                          filter_dir=filter_dir, out_dir=out_dir, counters=dict(counters), model=first_model(models))
    work.finish()
    return stats


def first_model(models: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The SAM model of the first shard that used one (shards of an earlier run included)."""
    return next((model for model in models if model is not None), None)

"""The ``embed`` stage as plain functions: join frames with masks, embed every subject, write.

Inputs: the filter stage's frames.parquet and the segment stage's masks.parquet (one mask row
per frame). Outputs, in ``embed.out_dir``: embeddings.parquet (frames order, one row per
embedded frame, model_id also in the schema metadata), rejects.parquet (this stage's rejects
only) and stats.json. Every input frame ends in exactly one of the two tables.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from flows import ids, reasons
from flows.accounting import FRAME, reject_row
from flows.config.params import EmbedParams, SourcesParams
from flows.embed.clip_model import LoadedClip, load_clip, spec_for
from flows.embed.encode import encode_batches
from flows.embed.preprocess import SubjectDataset, make_loader, split_preprocess
from flows.schemas import FRAMES, MASKS, REJECTS, embeddings_schema
from flows.tables import ROW_GROUP_ROWS, TableWriter, write_json_atomic

STAGE = "embed"
FRAME_COLUMNS = ["frame_id", "source", "subject_id", "image_path"]
MASK_COLUMNS = ["frame_id", "width", "height", "rle_counts", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def read_columns(path: Path, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """Some columns of a pipeline table, checking the file is that table."""
    missing = set(columns) - set(pq.read_schema(path).names)
    if missing:
        raise ValueError(f"{path}: not a {schema.metadata[b'table'].decode()} table (missing {sorted(missing)})")
    return pq.read_table(path, columns=columns)


def join_masks(frames: pa.Table, masks: pa.Table, sources: SourcesParams) -> tuple[pa.Table, pa.Table]:
    """(work, unmasked): frames with their mask columns and image file, in frames order; frames with no mask.

    Work columns: the frame columns, ``image_file`` (absolute or relative to the working
    directory), ``mask_width``, ``mask_height``, ``rle_counts`` and the COCO bbox.
    """
    if pc.count_distinct(masks["frame_id"]).as_py() != masks.num_rows:
        counts = pc.value_counts(masks["frame_id"]).to_pylist()
        dup = next(c["values"] for c in counts if c["counts"] > 1)
        raise ValueError(f"masks table has several rows for frame {dup!r}; the segment stage writes one per frame")
    position = pc.index_in(frames["frame_id"], value_set=masks["frame_id"])  # row in masks, null if none
    has_mask = pc.is_valid(position)
    work = frames.filter(has_mask)
    mask_rows = masks.take(position.filter(has_mask))
    for name in MASK_COLUMNS[1:]:
        renamed = {"width": "mask_width", "height": "mask_height"}.get(name, name)
        work = work.append_column(renamed, mask_rows[name])
    work = work.append_column("image_file", image_files(work, sources))
    return work, frames.filter(pc.invert(has_mask))


def image_files(frames: pa.Table, sources: SourcesParams) -> pa.Array:
    """``<source root>/<image_path>`` per frame (FRAMES.source picks the root)."""
    roots = {ids.MVIMGNET: sources.mvimgnet_root, ids.OPENIMAGES: sources.openimages_root}
    unknown = set(pc.unique(frames["source"]).to_pylist()) - roots.keys()
    if unknown:
        raise ValueError(f"frames from unknown source(s) {sorted(unknown)}")
    prefix = pc.if_else(pc.equal(frames["source"], ids.MVIMGNET),
                        roots[ids.MVIMGNET].rstrip("/") + "/", roots[ids.OPENIMAGES].rstrip("/") + "/")
    return pc.binary_join_element_wise(prefix, frames["image_path"], "").combine_chunks()


def segment_rejected(path: Path | None) -> pa.Array:
    """frame ids the segment stage rejected (they have no mask on purpose), from its rejects table.

    Without that table (masks made by other means), every frame without a mask is embed's reject.
    """
    if path is None or not path.exists():
        return pa.array([], pa.string())
    table = read_columns(path, REJECTS, ["item_id", "stage"])
    return table.filter(pc.equal(table["stage"], "segment"))["item_id"].combine_chunks()


def embed_frames(frames_path: Path, masks_path: Path, out_dir: Path, params: EmbedParams,
                 sources: SourcesParams, *, device: str = "auto", clip: LoadedClip | None = None,
                 segment_rejects: Path | None = None) -> dict:
    """Run the stage; return the stats also written to ``out_dir/stats.json``.

    ``clip`` overrides the model that ``params`` names (tests and benchmarks pass one in).
    Frames listed in ``segment_rejects`` are accounted for there and skipped here; any other
    frame without a mask is rejected as missing_mask.
    """
    torch_device = resolve_device(device)
    frames = read_columns(frames_path, FRAMES, FRAME_COLUMNS)
    masks = read_columns(masks_path, MASKS, MASK_COLUMNS)
    work, unmasked = join_masks(frames, masks, sources)
    upstream = pc.is_in(unmasked["frame_id"], value_set=segment_rejected(segment_rejects))
    skipped = int(pc.sum(upstream).as_py() or 0)
    unmasked = unmasked.filter(pc.invert(upstream))
    clip = clip or load_clip(spec_for(params), device=torch_device)
    schema = embeddings_schema(clip.dim).with_metadata(
        {**embeddings_schema(clip.dim).metadata, b"model_id": clip.model_id.encode()})
    out_dir.mkdir(parents=True, exist_ok=True)
    rejected: dict[str, int] = {}
    keys = work.select(["frame_id", "subject_id"]).combine_chunks()
    start = time.perf_counter()
    with TableWriter(out_dir / "rejects.parquet", REJECTS) as rejects, \
            _BufferedBatches(out_dir / "embeddings.parquet", schema) as embeddings:

        def reject(row: dict, reason: str, detail: str) -> None:
            rejects.write_row(reject_row(item_id=row["frame_id"], source=row["source"], kind=FRAME,
                                         path=row["image_path"], stage=STAGE, reason=reason, detail=detail))
            rejected[reason] = rejected.get(reason, 0) + 1

        for row in unmasked.select(FRAME_COLUMNS).to_pylist():
            reject(row, reasons.MISSING_MASK, "no row in the segment stage's masks table")
        for batch in _encode(work, clip, params, torch_device):
            ok = np.array([not r for r in batch.reasons], dtype=bool)
            embeddings.write(_embedding_rows(keys.take(pa.array(batch.indices[ok])), batch.embeddings[ok],
                                             clip.model_id, schema))
            for i in np.flatnonzero(~ok):
                reject(work.slice(int(batch.indices[i]), 1).select(FRAME_COLUMNS).to_pylist()[0],
                       batch.reasons[i], batch.details[i])
    seconds = time.perf_counter() - start
    count = embeddings.rows_written
    stats = {
        "count": count, "rejected": dict(sorted(rejected.items())), "frames_in": frames.num_rows,
        "rejected_by_segment": skipped,
        "dim": clip.dim, "model_id": clip.model_id, "random_weights": clip.random_weights,
        "device": torch_device.type, "dtype": "bfloat16 autocast" if torch_device.type == "cuda" else "float32",
        "batch_size": params.batch_size, "num_workers": params.num_workers,
        "seconds": round(seconds, 3), "throughput_img_s": round(work.num_rows / seconds, 1) if seconds else None,
    }
    write_json_atomic(out_dir / "stats.json", stats)
    return stats


def _encode(work: pa.Table, clip: LoadedClip, params: EmbedParams, device: torch.device):
    if work.num_rows == 0:
        return
    if device.type == "cpu" and params.num_workers > 0:
        # The workers take their cores; more model threads than the cores left only spin.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - params.num_workers))
        try:
            yield from _encode_on(work, clip, params, device)
        finally:
            torch.set_num_threads(threads)
    else:
        yield from _encode_on(work, clip, params, device)


def _encode_on(work: pa.Table, clip: LoadedClip, params: EmbedParams, device: torch.device):
    preprocess = split_preprocess(clip.preprocess)
    dataset = SubjectDataset(work, preprocess=preprocess.host, image_size=clip.image_size,
                             background=params.background_rgb)
    loader = make_loader(dataset, batch_size=params.batch_size, num_workers=params.num_workers,
                         pin_memory=device.type == "cuda")
    yield from encode_batches(clip.model, loader, device, on_device=preprocess.device)


def _embedding_rows(keys: pa.Table, embeddings: np.ndarray, model_id: str, schema: pa.Schema) -> pa.RecordBatch:
    """EMBEDDINGS rows from (frame_id, subject_id) keys and their (B, D) float16 embeddings."""
    dim = embeddings.shape[1]
    return pa.record_batch([
        keys["frame_id"].combine_chunks(), keys["subject_id"].combine_chunks(),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),  # (B*D,) -> B lists of D
        pa.array([model_id] * keys.num_rows, pa.string()),
    ], schema=schema)


class _BufferedBatches:
    """TableWriter for small record batches: gathers them into row groups of ROW_GROUP_ROWS."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._writer = TableWriter(path, schema)
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0

    @property
    def rows_written(self) -> int:
        return self._writer.rows_written

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._rows += batch.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_batch(pa.Table.from_batches(self._pending).combine_chunks())
        self._pending, self._rows = [], 0

    def __enter__(self) -> _BufferedBatches:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._flush()
        self._writer.__exit__(exc_type, exc, tb)

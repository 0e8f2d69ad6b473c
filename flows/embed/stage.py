"""The ``embed`` stage as plain functions: join frames with masks, embed every subject, write.

Inputs: the filter stage's frames.parquet and the segment stage's masks.parquet (one mask row
per frame, in frames order). Outputs, in ``embed.out_dir``: embeddings.parquet (frames order,
one row per embedded frame, model_id also in the schema metadata), rejects.parquet (this
stage's rejects only) and stats.json. Every input frame ends in exactly one of the two tables.

Both inputs are streamed (flows.embed.join), so memory stays flat however many frames there
are: a first pass over the frame ids rejects the frames without a mask (and checks the
tables' order before any model runs), a second feeds the joined rows to the DataLoader.

The embedded rows are written in parts of ``part_rows`` work rows in a resumable work folder
(flows.resume, ``out_dir/.work``): a run that fails keeps its finished parts, and the next
run with the same inputs, params, model and code embeds only the rest. The output table is
written as the batches come (a resumed run first copies its finished parts in), in row groups of
a fixed size, so the outputs are the same either way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from flows import reasons
from flows.accounting import FRAME, AccountingError, reject_row
from flows.config.params import EmbedParams, SourcesParams
from flows.embed.clip_model import LoadedClip, check_weights, load_clip, spec_for
from flows.embed.encode import LAUNCHED_AHEAD, EncodedBatch, encode_batches
from flows.embed.join import (
    CHUNK_ROWS, FRAME_COLUMNS, MASK_COLUMNS, check_sources, iter_chunks, join_masks, mask_positions, read_columns,
)
from flows.embed.preprocess import (
    WORK_COLUMNS, StreamedSubjects, SubjectCutter, make_stream_loader, split_preprocess,
)
from flows.schemas import REJECTS, embeddings_schema
from flows.progress import Progress
from flows.resume import ResumableWork, device_identity, file_identity, library_versions, work_key
from flows.tables import FixedRowGroups, TableWriter, concat_tables, iter_batches, write_stats

STAGE = "embed"
PART_ROWS = 262_144  # work rows per resumable part (rounded up to whole batches): ~5 min of a GPU
# Rows a loader worker prepares at a time. A model batch is cut into pieces for several workers,
# so the first batch is ready in 1/8 of the time at batch 256 (one worker at ~200 img/s needed
# 1.3 s for all 256 rows, the GPU 0.14 s); the pieces are joined on the device.
WORKER_ROWS = 32
# The join's names stay importable from here (tests, benchmarks/bench_embed.py).
__all__ = ["FRAME_COLUMNS", "MASK_COLUMNS", "AccountingError", "check_accounting", "embed_frames", "join_masks",
           "read_columns", "segment_rejected"]

log = logging.getLogger(__name__)


def check_accounting(*, frames_in: int, embedded: int, rejected: dict[str, int], rejected_by_segment: int) -> None:
    """Raise :class:`AccountingError` unless every input frame is counted exactly once.

    ``rejected``: this stage's rejects per reason; ``rejected_by_segment``: frames without a
    mask that the segment stage rejected (accounted for in its rejects table, skipped here).
    """
    n_rejected = sum(rejected.values())
    if frames_in != embedded + n_rejected + rejected_by_segment:
        raise AccountingError(f"{frames_in} input frames != {embedded} embedded + {n_rejected} embed rejects "
                              f"{dict(sorted(rejected.items()))} + {rejected_by_segment} rejected by segment")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def segment_rejected(path: Path | None) -> pa.Array:
    """frame ids the segment stage rejected (they have no mask on purpose), from its rejects table.

    Without that table (masks made by other means), every frame without a mask is embed's reject.
    """
    if path is None or not path.exists():
        return pa.array([], pa.string())
    # streamed: the table also holds every ingest and filter reject (millions of rows), which are not kept
    ids = [batch.filter(pc.equal(batch["stage"], "segment"))["item_id"]
           for batch in iter_batches(path, REJECTS, columns=["item_id", "stage"])]
    return pa.concat_arrays(ids) if ids else pa.array([], pa.string())


def embed_frames(frames_path: Path, masks_path: Path, out_dir: Path, params: EmbedParams,
                 sources: SourcesParams, *, device: str = "auto", clip: LoadedClip | None = None,
                 segment_rejects: Path | None = None, chunk_rows: int = CHUNK_ROWS,
                 part_rows: int = PART_ROWS) -> dict:
    """Run the stage; return the stats also written to ``out_dir/stats.json``.

    ``clip`` overrides the model that ``params`` names (tests and benchmarks pass one in).
    Frames listed in ``segment_rejects`` are accounted for there and skipped here; any other
    frame without a mask is rejected as missing_mask. ``chunk_rows`` frames are joined at a time;
    ``part_rows`` (rounded up to whole batches) work rows make one resumable part.
    """
    began = time.monotonic()  # Progress's clock
    torch_device = resolve_device(device)
    part_rows = -(-part_rows // params.batch_size) * params.batch_size  # parts end between batches
    inputs = [frames_path, masks_path] + ([segment_rejects] if segment_rejects and segment_rejects.exists() else [])
    rejected: Counter[str] = Counter()
    first_pass = out_dir / ".embed-unmasked.rejects.parquet"
    with TableWriter(first_pass, REJECTS) as unmasked:  # ids only: cheap, so redone on every run

        def reject(row: dict, reason: str, detail: str) -> None:
            unmasked.write_row(_reject(row, reason, detail))
            rejected[reason] += 1

        tally = _reject_unmasked(frames_path, masks_path, segment_rejected(segment_rejects), reject, chunk_rows)
    # Only now the work folder: a bad input (masks out of order) fails above with nothing written.
    work = ResumableWork(out_dir / ".work", _work_key(inputs, params, sources, clip, torch_device, part_rows))
    work.open()
    unmasked_path = work.folder / "unmasked.rejects.parquet"
    os.replace(first_pass, unmasked_path)
    parts = work.done_prefix("part", limit=-(-tally.masked // part_rows))
    clip = clip or load_clip(spec_for(params), device=torch_device)
    schema = embeddings_schema(clip.dim).with_metadata(
        {**embeddings_schema(clip.dim).metadata, b"model_id": clip.model_id.encode()})
    skip = len(parts) * part_rows
    if parts:
        log.info("embed: resuming in %s: %d of %d work rows were embedded by an earlier run of the same inputs, "
                 "params, model and code", work.folder, min(skip, tally.masked), tally.masked)
    stream = _WorkStream(frames_path, masks_path, sources, batch_size=params.batch_size, chunk_rows=chunk_rows,
                         skip_rows=skip)
    part: _Part | None = None
    # The output is written beside the parts as the batches come, so nothing is re-read and
    # re-encoded after the loop (10 GB of embeddings at OpenImages scale); a resumed run first
    # copies its finished parts in. Row groups of exactly ROW_GROUP_ROWS make the bytes the same
    # either way. It is made in the work folder (where a killed run's temporary file is cleaned
    # up with the folder) and moved into place only once the counts add up.
    output_path = work.folder / "output.embeddings.parquet"
    for stale in work.folder.glob(f".{output_path.name}.*.tmp"):  # a killed run's (up to the whole output)
        stale.unlink()
    with FixedRowGroups(output_path, schema) as output:
        for n in range(len(parts)):
            for rows in iter_batches(work.folder / f"part-{n:05d}.embeddings.parquet", schema):
                output.write(rows)
        progress = Progress("embed", tally.masked - min(skip, tally.masked))  # the copy above counts as setup
        steady = _SteadyRate(progress.clock, drained=LAUNCHED_AHEAD)
        try:
            for batch in _encode(stream, tally.masked - min(skip, tally.masked), clip, params, torch_device):
                progress.update(len(batch.indices))
                steady.batch_done(len(batch.indices))
                index = int(batch.indices[0]) // part_rows
                if part is None or part.index != index:
                    if part is not None:
                        parts.append(part.finish(work))
                    part = _Part(work, index, schema)
                output.write(part.write(batch, stream.frames_of(batch), clip.model_id))
            if part is not None:
                parts.append(part.finish(work))
                part = None
        finally:
            if part is not None:
                part.abort()
        seconds = progress.close()
        loop_end = time.monotonic()
        names = [f"part-{n:05d}" for n in range(len(parts))]
        embedded = sum(record["embedded"] for record in parts)
        for record in parts:
            rejected.update(record["rejected"])
        check_accounting(frames_in=tally.frames_in, embedded=embedded, rejected=rejected,
                         rejected_by_segment=tally.skipped)
        if output.rows_written != embedded:  # the output is a second write path: it is counted too
            raise AccountingError(f"{output.rows_written} rows in the output != {embedded} embedded")
    concat_tables([unmasked_path] + [work.folder / f"{name}.rejects.parquet" for name in names],
                  out_dir / "rejects.parquet", REJECTS)
    os.replace(output_path, out_dir / "embeddings.parquet")  # the same file system: atomic
    stats = {
        "count": embedded, "rejected": dict(sorted(rejected.items())), "frames_in": tally.frames_in,
        "rejected_by_segment": tally.skipped,
        "dim": clip.dim, "model_id": clip.model_id, "random_weights": clip.random_weights,
        "device": torch_device.type, "dtype": "bfloat16 autocast" if torch_device.type == "cuda" else "float32",
        "batch_size": params.batch_size, "num_workers": params.num_workers,
    }
    timing = {"seconds": round(seconds, 3), "throughput_img_s": round((tally.masked - min(skip, tally.masked))
                                                                       / seconds, 1) if seconds else None,
              **steady.summary(progress.start), "setup_s": round(progress.start - began, 3),
              "outputs_s": round(time.monotonic() - loop_end, 3)}
    result = write_stats(out_dir, stats, timing=timing)
    work.finish()
    log.info("embed: %.2f s before the encoding loop (inputs, work key), %.2f s in it, %.2f s after it (outputs)",
             progress.start - began, seconds, time.monotonic() - loop_end)
    return result


class _SteadyRate:
    """When the batches came back: the start-up (loader workers, first pieces) and the rate in
    between, the stage's throughput once running (timing.json; benchmarks/bench_embed.py).

    The last ``drained`` batches (flows.embed.encode.LAUNCHED_AHEAD) come back together when the
    input ends, so the rate runs from the first batch to the last one handed back in step with
    the device; counting the drain would inflate it.
    """

    def __init__(self, clock: Callable[[], float], drained: int):
        self.clock, self.drained = clock, drained
        self.times: list[float] = []
        self.rows: list[int] = []

    def batch_done(self, rows: int) -> None:
        self.times.append(self.clock())
        self.rows.append(rows)

    def summary(self, start: float) -> dict:
        if not self.times:
            return {}
        last = max(1, len(self.times) - 1 - self.drained)  # the last batch before the drain (at least the second)
        out = {"first_batch_s": round(self.times[0] - start, 3), "steady_img_s": None}
        if last < len(self.times) and self.times[last] > self.times[0]:
            out["steady_img_s"] = round(sum(self.rows[1:last + 1]) / (self.times[last] - self.times[0]), 1)
        return out


def _work_key(inputs: list[Path], params: EmbedParams, sources: SourcesParams, clip: LoadedClip | None,
              device: torch.device, part_rows: int) -> str:
    """What decides a part's bytes (flows.resume): inputs, the params that change the output (not
    num_workers, the knob a user turns after a worker crash; on a CPU, though, the model's thread
    count, which it sets and which can change float results), model and weights file, device
    type (bf16 autocast on CUDA, float32 elsewhere), libraries and the part size."""
    if clip is not None:
        model = clip.model_id
    else:
        spec = spec_for(params)
        weights = check_weights(spec)
        model = f"{spec.model}:{spec.pretrained}:{file_identity(weights) if weights else 'random'}"
    return work_key(inputs=inputs, code=["embed"], params={
        "embed": dataclasses.replace(params, num_workers=0, out_dir=""), "sources": sources, "model": model,
        "device": device_identity(device), "part_rows": part_rows,
        "cpu_threads": _cpu_threads(params) if device.type == "cpu" else None,
        "versions": library_versions("torch", "torchvision", "open_clip_torch", "pillow", "numpy", "pycocotools")})


def _cpu_threads(params: EmbedParams) -> int:
    """The model's threads on a CPU: the cores the loader workers leave (all of torch's without workers)."""
    if params.num_workers > 0:
        return max(1, len(os.sched_getaffinity(0)) - params.num_workers)
    return torch.get_num_threads()


def _reject(row: dict, reason: str, detail: str) -> dict:
    return reject_row(item_id=row["frame_id"], source=row["source"], kind=FRAME, path=row["image_path"],
                      stage=STAGE, reason=reason, detail=detail)


class _Part:
    """One resumable part: its embeddings and its rejects (frames that failed to decode), in work order."""

    def __init__(self, work: ResumableWork, index: int, schema: pa.Schema):
        self.index, self.name = index, f"part-{index:05d}"
        self.embeddings = FixedRowGroups(work.folder / f"{self.name}.embeddings.parquet", schema)
        self.rejects = TableWriter(work.folder / f"{self.name}.rejects.parquet", REJECTS)
        self.rejected: Counter[str] = Counter()
        self.rows = 0

    def write(self, batch: EncodedBatch, frames: pa.Table, model_id: str) -> pa.RecordBatch:
        """Write one encoded batch; return its embedding rows."""
        ok = np.array([not r for r in batch.reasons], dtype=bool)
        rows = _embedding_rows(frames.filter(pa.array(ok)), batch.embeddings[ok], model_id, self.embeddings.schema)
        self.embeddings.write(rows)
        for i in np.flatnonzero(~ok):
            self.rejects.write_row(_reject(frames.slice(int(i), 1).to_pylist()[0], batch.reasons[i],
                                           batch.details[i]))
            self.rejected[batch.reasons[i]] += 1
        self.rows += len(batch.indices)
        return rows

    def finish(self, work: ResumableWork) -> dict:
        """Close both files (atomically), then mark the part done; returns its record."""
        self.embeddings.__exit__(None, None, None)
        self.rejects.close()
        record = {"rows": self.rows, "embedded": self.embeddings.rows_written, "rejected": dict(self.rejected)}
        work.mark_done(self.name, record, files=[self.embeddings.path, self.rejects.path])
        return record

    def abort(self) -> None:
        self.embeddings.__exit__(RuntimeError, None, None)
        self.rejects.abort()


class _Tally(NamedTuple):
    frames_in: int  # rows of the frames table
    masked: int  # frames with a mask row: the work the model gets
    skipped: int  # frames without one that the segment stage rejected (its rejects, not ours)


def _reject_unmasked(frames: Path, masks: Path, upstream: pa.Array, reject: Callable[[dict, str, str], None],
                     chunk_rows: int) -> _Tally:
    """First pass, over the ids only: reject the frames with no mask row, in frames order.

    Also finds a bad masks table (out of order, repeated rows) or an unknown source before any
    model runs. ``upstream``: the segment stage's rejects, skipped here.
    """
    skip = set(upstream.to_pylist())  # O(segment rejects), as segment_rejected already is
    frames_in = masked = skipped = 0
    for chunk, masks_chunk in iter_chunks(frames, masks, mask_columns=["frame_id"], chunk_rows=chunk_rows):
        has_mask = pc.is_valid(mask_positions(chunk["frame_id"], masks_chunk["frame_id"]))
        work = chunk.filter(has_mask)
        check_sources(work)
        frames_in, masked = frames_in + chunk.num_rows, masked + work.num_rows
        for row in chunk.filter(pc.invert(has_mask)).to_pylist():
            if row["frame_id"] in skip:
                skipped += 1
            else:
                reject(row, reasons.MISSING_MASK, "no row in the segment stage's masks table")
    return _Tally(frames_in, masked, skipped)


class _WorkStream:
    """The joined work rows as the loader's batch sampler, each batch's frame columns kept until it is encoded.

    Batches are ``batch_size`` rows of the whole work sequence (as a loader over one work
    table would cut them), whatever the chunks: the same batches give the same embeddings.
    Each batch goes to the loader in pieces of WORKER_ROWS rows (flows.embed.encode joins them).
    """

    def __init__(self, frames: Path, masks: Path, sources: SourcesParams, *, batch_size: int, chunk_rows: int,
                 skip_rows: int = 0):
        """``skip_rows``: a multiple of ``batch_size``; the work rows before it are joined but not handed out."""
        self._frames, self._masks, self._sources = frames, masks, sources
        self._batch_size, self._chunk_rows, self._skip = batch_size, chunk_rows, skip_rows
        self._in_flight: deque[tuple[int, pa.Table]] = deque()  # (first work row, FRAME_COLUMNS) per batch

    def __iter__(self) -> Iterator[list[tuple[int, dict]]]:
        self._in_flight.clear()
        chunks = (join_masks(frames, masks, self._sources)[0]
                  for frames, masks in iter_chunks(self._frames, self._masks, chunk_rows=self._chunk_rows))
        start = 0
        for batch in _rebatch(chunks, self._batch_size):
            if start >= self._skip:
                self._in_flight.append((start, batch.select(FRAME_COLUMNS)))
                rows = list(enumerate(batch.select(list(WORK_COLUMNS)).to_pylist(), start))
                for first in range(0, len(rows), WORKER_ROWS):  # one piece per loader worker
                    yield rows[first:first + WORKER_ROWS]
            start += batch.num_rows

    def frames_of(self, encoded: EncodedBatch) -> pa.Table:
        """FRAME_COLUMNS of an encoded batch's rows; batches come back in the order they went out."""
        start, frames = self._in_flight.popleft()
        if encoded.indices.tolist() != list(range(start, start + frames.num_rows)):
            raise RuntimeError(f"encoded batch {encoded.indices[:3]}... is not work rows {start}.. in order")
        return frames


def _rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables``, in order, regrouped into tables of ``rows`` rows (the last may be shorter)."""
    parts: list[pa.Table] = []
    have = 0
    for table in tables:
        offset = 0
        while offset < table.num_rows:
            take = min(rows - have, table.num_rows - offset)
            parts.append(table.slice(offset, take))
            have, offset = have + take, offset + take
            if have == rows:
                yield pa.concat_tables(parts)
                parts, have = [], 0
    if parts:
        yield pa.concat_tables(parts)


def _encode(stream: _WorkStream, rows: int, clip: LoadedClip, params: EmbedParams,
            device: torch.device) -> Iterator[EncodedBatch]:
    if rows == 0:
        return
    if device.type == "cpu" and params.num_workers > 0:
        # The workers take their cores; more model threads than the cores left only spin.
        threads = torch.get_num_threads()
        torch.set_num_threads(_cpu_threads(params))
        try:
            yield from _encode_on(stream, clip, params, device)
        finally:
            torch.set_num_threads(threads)
    else:
        yield from _encode_on(stream, clip, params, device)


def _encode_on(stream: _WorkStream, clip: LoadedClip, params: EmbedParams,
               device: torch.device) -> Iterator[EncodedBatch]:
    preprocess = split_preprocess(clip.preprocess)
    dataset = StreamedSubjects(SubjectCutter(preprocess=preprocess.host, image_size=clip.image_size,
                                             background=params.background_rgb))
    # Two model batches per worker in flight, as when a worker prepared whole batches.
    loader = make_stream_loader(dataset, stream, num_workers=params.num_workers, pin_memory=device.type == "cuda",
                                prefetch_pieces=2 * -(-params.batch_size // WORKER_ROWS))
    yield from encode_batches(clip.model, loader, device, batch_rows=params.batch_size,
                              on_device=preprocess.device)


def _embedding_rows(keys: pa.Table, embeddings: np.ndarray, model_id: str, schema: pa.Schema) -> pa.RecordBatch:
    """EMBEDDINGS rows from (frame_id, subject_id) keys and their (B, D) float16 embeddings."""
    dim = embeddings.shape[1]
    return pa.record_batch([
        keys["frame_id"].combine_chunks(), keys["subject_id"].combine_chunks(),
        pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), dim),  # (B*D,) -> B lists of D
        pa.array([model_id] * keys.num_rows, pa.string()),
    ], schema=schema)

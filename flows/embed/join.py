"""Frames joined with their masks, a chunk of frames at a time: the embed stage's reader.

The segment stage writes masks.parquet in frames order, minus the frames it rejected, so one
merge pass over both tables finds every frame's mask without holding either table (as
flows/pairs/join.py does for the pairs stage). Within a chunk, rows are matched by frame id,
so only the order of the chunks has to agree; a mask row that falls behind its chunk is an
error, never a silent miss.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows import ids
from flows.config.params import SourcesParams
from flows.paths import image_root
from flows.schemas import FRAMES, MASKS
from flows.tables import TableReadError, open_table

CHUNK_ROWS = 4096  # frames joined at a time; their masks' RLE is what the stage holds in memory
FRAME_COLUMNS = ["frame_id", "source", "subject_id", "image_path"]
MASK_COLUMNS = ["frame_id", "width", "height", "rle_counts", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]


def open_columns(path: Path, schema: pa.Schema, columns: list[str]) -> pq.ParquetFile:
    """A pipeline table to stream ``columns`` of, checking the file is that table."""
    file = open_table(path)
    _check_columns(path, file.schema_arrow, schema, columns)
    return file


def read_columns(path: Path, schema: pa.Schema, columns: list[str]) -> pa.Table:
    """Some columns of a whole pipeline table, checking the file is that table (all of it in memory)."""
    file = open_table(path)
    _check_columns(path, file.schema_arrow, schema, columns)
    return file.read(columns=columns)


def _check_columns(path: Path, found: pa.Schema, schema: pa.Schema, columns: list[str]) -> None:
    missing = set(columns) - set(found.names)
    if missing:
        raise TableReadError(f"{path}: not a {schema.metadata[b'table'].decode()} table (missing {sorted(missing)})")


def iter_chunks(frames: Path, masks: Path, *, mask_columns: list[str] = MASK_COLUMNS,
                chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[pa.Table, pa.Table]]:
    """(frames chunk, its mask rows): FRAME_COLUMNS of ``chunk_rows`` frames at a time, in frames order.

    ``mask_columns``: the columns of the mask rows (the tables are checked for all of
    FRAME_COLUMNS and MASK_COLUMNS whatever is read, so a bad table fails on the first pass).
    Raises ValueError once the frames run out if a mask row was never matched: it came after
    a later frame's (masks out of frames order), or names no frame, or repeats an earlier one.
    """
    frame_file = open_columns(frames, FRAMES, FRAME_COLUMNS)
    cursor = _MaskCursor(open_columns(masks, MASKS, MASK_COLUMNS), mask_columns, chunk_rows)
    for batch in frame_file.iter_batches(batch_size=chunk_rows, columns=FRAME_COLUMNS):
        yield pa.Table.from_batches([batch]), cursor.take_run(batch.column("frame_id"))
    stray = cursor.next_frame_id()
    if stray is not None:
        raise ValueError(f"{masks}: the mask row of frame {stray!r} does not follow {frames}'s order (a frame "
                         "that is not there, a repeated row, or masks out of frames order); the segment stage "
                         "writes one row per frame, in frames order")


class _MaskCursor:
    """Mask rows read ahead in batches; hands out, chunk by chunk, the run of rows that belong to it."""

    def __init__(self, file: pq.ParquetFile, columns: list[str], batch_rows: int):
        self._batches = file.iter_batches(batch_size=batch_rows, columns=columns)
        self._schema = pa.schema([file.schema_arrow.field(name) for name in columns])
        self._head: pa.RecordBatch | None = None  # read, not handed out yet; never empty

    def take_run(self, frame_ids: pa.Array) -> pa.Table:
        """The rows from here on whose frame is in ``frame_ids``, up to the first one whose frame is not."""
        run = []
        while self._fill():
            inside = pc.is_in(self._head["frame_id"], value_set=frame_ids)
            stop = pc.index(inside, False).as_py()  # first row not of this chunk; -1: none in this batch
            if stop == -1:
                run.append(self._head)
                self._head = None
            else:
                run.append(self._head.slice(0, stop))
                self._head = self._head.slice(stop)
                break
        return pa.Table.from_batches(run, schema=self._schema)

    def next_frame_id(self) -> str | None:
        return self._head["frame_id"][0].as_py() if self._fill() else None

    def _fill(self) -> bool:
        while self._head is None:
            batch = next(self._batches, None)
            if batch is None:
                return False
            self._head = batch if batch.num_rows else None
        return True


def mask_positions(frame_ids: pa.ChunkedArray, mask_ids: pa.ChunkedArray) -> pa.Array:
    """Each frame's row in ``mask_ids``, null if it has none; raises if a frame has several."""
    if pc.count_distinct(mask_ids).as_py() != len(mask_ids):
        counts = pc.value_counts(mask_ids).to_pylist()
        dup = next(c["values"] for c in counts if c["counts"] > 1)
        raise ValueError(f"masks table has several rows for frame {dup!r}; the segment stage writes one per frame")
    return pc.index_in(frame_ids, value_set=mask_ids)


def join_masks(frames: pa.Table, masks: pa.Table, sources: SourcesParams) -> tuple[pa.Table, pa.Table]:
    """(work, unmasked): frames with their mask columns and image file, in frames order; frames with no mask.

    Work columns: the frame columns, ``image_file`` (absolute or relative to the working
    directory), ``mask_width``, ``mask_height``, ``rle_counts`` and the COCO bbox.
    """
    position = mask_positions(frames["frame_id"], masks["frame_id"])  # row in masks, null if none
    has_mask = pc.is_valid(position)
    work = frames.filter(has_mask)
    mask_rows = masks.take(position.filter(has_mask))
    for name in MASK_COLUMNS[1:]:
        renamed = {"width": "mask_width", "height": "mask_height"}.get(name, name)
        work = work.append_column(renamed, mask_rows[name])
    work = work.append_column("image_file", image_files(work, sources))
    return work, frames.filter(pc.invert(has_mask))


def check_sources(frames: pa.Table) -> None:
    """Raise if a frame comes from a source that has no root in SourcesParams."""
    unknown = set(pc.unique(frames["source"]).to_pylist()) - {ids.MVIMGNET, ids.OPENIMAGES}
    if unknown:
        raise ValueError(f"frames from unknown source(s) {sorted(unknown)}")


def image_files(frames: pa.Table, sources: SourcesParams) -> pa.Array:
    """``<source root>/<image_path>`` per frame (FRAMES.source picks the root)."""
    check_sources(frames)
    prefix = pc.if_else(pc.equal(frames["source"], ids.MVIMGNET),
                        str(image_root(sources, ids.MVIMGNET)) + "/", str(image_root(sources, ids.OPENIMAGES)) + "/")
    return pc.binary_join_element_wise(prefix, frames["image_path"], "").combine_chunks()

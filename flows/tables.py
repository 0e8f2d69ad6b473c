"""Reading and writing the pipeline's Parquet tables: schema-checked, streaming and atomic.

Writers stream record batches into a temporary file beside the target and rename it into
place only when closed cleanly, so a killed writer never leaves a truncated table.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from flows.errors import UserFacingError

ROW_GROUP_ROWS = 8192


class TableWriter:
    """Streams rows (dicts) or record batches into one Parquet file with a fixed schema.

    Use as a context manager: on a clean exit the temp file is renamed onto ``path``;
    on an exception it is deleted and ``path`` is left as it was.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, *, buffer_rows: int = ROW_GROUP_ROWS):
        self.path = Path(path)
        self.schema = schema
        self.rows_written = 0
        self._buffer: list[Mapping[str, Any]] = []
        self._buffer_rows = buffer_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name the writer creates itself, so the file gets the umask's mode (mkstemp's is 0600).
        self._tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        # Fixed writer options so identical rows give identical bytes. Float vectors (embeddings,
        # poses, crop boxes) get no dictionary (parquet tries one on every value, then gives up)
        # and no min/max (of their elements: no reader uses them); that halves an embeddings
        # write, which the embed stage does in its encoding loop.
        scalars = [field.name for field in schema if not _is_float_vector(field.type)]
        plain = len(scalars) < len(schema)
        self._writer = pq.ParquetWriter(
            self._tmp, schema, compression="zstd", store_schema=True,
            use_dictionary=scalars if plain else True, write_statistics=scalars if plain else True,
        )

    def write_row(self, row: Mapping[str, Any]) -> None:
        self._buffer.append(row)
        if len(self._buffer) >= self._buffer_rows:
            self._flush()

    def write_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write_row(row)

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        self._flush()
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.rows_written += table.num_rows

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        self._writer.write_table(table)
        self.rows_written += table.num_rows
        self._buffer = []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _is_float_vector(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind)) and pa.types.is_floating(kind.value_type)


def write_table(path: str | Path, schema: pa.Schema, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write all ``rows`` to ``path`` atomically; return the row count."""
    with TableWriter(path, schema) as writer:
        writer.write_rows(rows)
    return writer.rows_written


class TableReadError(UserFacingError, ValueError):
    """A pipeline table that is missing, not Parquet, or not of the expected table."""


def open_table(path: str | Path, schema: pa.Schema | None = None) -> pq.ParquetFile:
    """Open a Parquet table, failing in one line that names the file (and its columns, if ``schema``)."""
    name = schema.metadata[b"table"].decode() if schema is not None and schema.metadata else "Parquet"
    try:
        file = pq.ParquetFile(path)
    except FileNotFoundError:
        raise TableReadError(f"{path}: no such file; run the stage that writes it first "
                             f"(dvc repro, or dvc repro <stage>)") from None
    except pa.ArrowInvalid as exc:  # not Parquet, truncated, empty; other I/O errors keep their traceback
        raise TableReadError(f"{path}: not a readable {name} table ({type(exc).__name__}: {exc}); "
                             f"the file is damaged or not Parquet: rerun the stage that writes it") from None
    if schema is not None:
        missing = set(schema.names) - set(file.schema_arrow.names)
        if missing:
            raise TableReadError(f"{path}: not a {name} table (missing {sorted(missing)})")
    return file


def iter_batches(path: str | Path, schema: pa.Schema, *, batch_rows: int = ROW_GROUP_ROWS,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a table in record batches, checking it was written with ``schema``."""
    yield from open_table(path, schema).iter_batches(batch_size=batch_rows, columns=columns)


def iter_rows(path: str | Path, schema: pa.Schema, **kwargs) -> Iterator[dict[str, Any]]:
    """Stream a table as dicts, one batch in memory at a time."""
    for batch in iter_batches(path, schema, **kwargs):
        yield from batch.to_pylist()


class FixedRowGroups:
    """TableWriter for record batches of any size: row groups of exactly ROW_GROUP_ROWS rows (the
    last one shorter), so the file's bytes do not depend on how its rows were split into batches."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.schema, self.path = schema, path
        self._writer = TableWriter(path, schema)
        self._pending: list[pa.RecordBatch] = []
        self._rows = 0

    @property
    def rows_written(self) -> int:
        return self._writer.rows_written + self._rows

    def write(self, batch: pa.RecordBatch) -> None:
        self._pending.append(batch)
        self._rows += batch.num_rows
        if self._rows >= ROW_GROUP_ROWS:
            table = pa.Table.from_batches(self._pending)
            full = table.num_rows - table.num_rows % ROW_GROUP_ROWS
            for start in range(0, full, ROW_GROUP_ROWS):
                self._writer.write_batch(table.slice(start, ROW_GROUP_ROWS).combine_chunks())
            rest = table.slice(full).combine_chunks()
            self._pending, self._rows = rest.to_batches(), rest.num_rows

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_batch(pa.Table.from_batches(self._pending).combine_chunks())
        self._pending, self._rows = [], 0

    def __enter__(self) -> FixedRowGroups:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._flush()
        self._writer.__exit__(exc_type, exc, tb)


def concat_tables(parts: Iterable[str | Path], target: str | Path, schema: pa.Schema) -> int:
    """Stream every part, in the given order, into ``target`` (atomic); return the row count.

    Row groups of exactly ROW_GROUP_ROWS: the same rows give the same bytes however they were split
    into parts (a stage's shard size is not an output-affecting param, so must not move DVC's hash).
    """
    with FixedRowGroups(target, schema) as writer:
        for part in parts:
            for batch in iter_batches(part, schema):
                writer.write(batch)
    return writer.rows_written


def fixed_size_list_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A FixedSizeList column (e.g. embeddings) as an (n, size) array, without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)  # (n, size)


def count_rows(path: str | Path) -> int:
    return open_table(path).metadata.num_rows


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON with sorted keys (stable bytes), via a temp file and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_stats(out_dir: str | Path, stats: dict[str, Any], *, timing: dict[str, Any]) -> dict[str, Any]:
    """``stats.json`` (what was made: the same bytes for the same inputs, a DVC metric) and ``timing.json``
    (how long it took: differs every run, so kept out of DVC and git); returns both merged."""
    write_json_atomic(Path(out_dir) / "timing.json", timing)
    write_json_atomic(Path(out_dir) / "stats.json", stats)  # last: a stage may treat it as the mark of a finished run
    return {**stats, **timing}

import os
import stat

import pyarrow as pa
import pytest

from flows.schemas import REJECTS
from flows import tables
from flows.tables import TableReadError, TableWriter, concat_tables, count_rows, iter_rows, write_table


def _reject(i):
    return {"item_id": f"x{i}", "source": "mvimgnet", "item_kind": "frame", "path": None, "stage": "ingest",
            "reason": "empty_file", "detail": ""}


def test_tables_get_the_umasks_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_table(tmp_path / "r.parquet", REJECTS, [_reject(0)])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.parquet").stat().st_mode) == 0o644  # readable by the other researchers
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # no temp file left


def test_an_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with TableWriter(tmp_path / "r.parquet", REJECTS) as writer:
            writer.write_row(_reject(0))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_or_missing_table_fails_in_one_line_naming_the_file(tmp_path):
    write_table(tmp_path / "r.parquet", REJECTS, [_reject(i) for i in range(3)])
    data = (tmp_path / "r.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TableReadError, match=r"cut\.parquet: not a readable rejects table .*rerun the stage"):
        list(iter_rows(tmp_path / "cut.parquet", REJECTS))
    with pytest.raises(TableReadError, match=r"gone\.parquet: no such file; run the stage that writes it"):
        count_rows(tmp_path / "gone.parquet")
    pa.parquet.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(TableReadError, match=r"other\.parquet: not a rejects table \(missing"):
        list(iter_rows(tmp_path / "other.parquet", REJECTS))


def test_float_vectors_are_written_plain_and_scalars_keep_their_dictionary_and_statistics(tmp_path):
    """Embeddings, poses and crop boxes: parquet's dictionary attempt on every float only costs time
    (the embed stage writes in its encoding loop), and their elements' min/max serve no reader;
    the scalar columns, which the report's row-group pruning reads, keep both."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.schemas import embeddings_schema
    from flows.tables import TableWriter

    schema = embeddings_schema(8)
    table = pa.table({"frame_id": ["a", "b"], "subject_id": ["s", "s"],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(16, np.float16)), 8),
                      "model_id": ["m", "m"]}).select(schema.names).cast(schema)
    with TableWriter(tmp_path / "e.parquet", schema) as writer:
        writer.write_batch(table)
    group = pq.ParquetFile(tmp_path / "e.parquet").metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    vector = columns["embedding.list.element"]
    assert not vector.is_stats_set and not any("DICTIONARY" in e for e in vector.encodings)
    for name in ("frame_id", "subject_id", "model_id"):
        assert columns[name].is_stats_set and "RLE_DICTIONARY" in columns[name].encodings
    assert pq.read_table(tmp_path / "e.parquet").equals(table)


def test_every_nested_column_of_the_schemas_is_a_float_vector():
    """TableWriter names the scalar columns to keep dictionary and statistics; a nested column of
    another kind (a list of ints) would lose both without a word, so none may exist unnoticed."""
    import pyarrow as pa

    from flows import schemas
    from flows.tables import _is_float_vector

    tables = [v for v in vars(schemas).values() if isinstance(v, pa.Schema)] + [schemas.embeddings_schema(8)]
    assert len(tables) > 5
    for schema in tables:
        for field in schema:
            if pa.types.is_nested(field.type):
                assert _is_float_vector(field.type), (schema.metadata, field)


def test_concatenated_bytes_do_not_depend_on_how_the_rows_were_split_into_parts(tmp_path, monkeypatch):
    # a stage's shard size (segment.frames_per_shard, ingest.frames_per_shard) is no output param:
    # it must not change the output's bytes, or DVC reruns every stage after it for nothing
    monkeypatch.setattr(tables, "ROW_GROUP_ROWS", 7)
    rows = [{"item_id": f"f{i:03d}", "source": "mvimgnet", "item_kind": "frame", "path": f"{i}.jpg",
             "stage": "filter", "reason": "blurry", "detail": str(i)} for i in range(40)]
    files = {}
    for split in ([40], [3, 30, 7], [16] * 2 + [8], [1] * 40):
        parts, start = [], 0
        for n, size in enumerate(split):
            parts.append(tmp_path / f"{len(split)}-{n}.parquet")
            write_table(parts[-1], REJECTS, rows[start:start + size])
            start += size
        target = tmp_path / f"all-{len(split)}.parquet"
        assert concat_tables(parts, target, REJECTS) == 40
        files[tuple(split)] = target.read_bytes()
    assert len(set(files.values())) == 1
    import pyarrow.parquet as pq

    assert [pq.ParquetFile(target).metadata.row_group(g).num_rows for g in range(6)] == [7] * 5 + [5]

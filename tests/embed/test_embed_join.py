import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.embed.join import FRAME_COLUMNS, MASK_COLUMNS, iter_chunks, join_masks, read_columns
from flows.schemas import FRAMES, MASKS
from flows.tables import write_table
from embed_inputs import make_inputs, masks_in_frames_order


def _joined(inputs, chunk_rows):
    parts = [join_masks(frames, masks, inputs.sources) for frames, masks in
             iter_chunks(inputs.frames, inputs.masks, chunk_rows=chunk_rows)]
    return pa.concat_tables([w for w, _ in parts]), pa.concat_tables([u for _, u in parts])


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, 100])
def test_chunks_join_as_the_whole_tables_do(tmp_path, chunk_rows):
    inputs = masks_in_frames_order(make_inputs(tmp_path, n=11, unmasked=(0, 4, 5, 10)))
    work, unmasked = _joined(inputs, chunk_rows)
    whole_work, whole_unmasked = join_masks(read_columns(inputs.frames, FRAMES, FRAME_COLUMNS),
                                            read_columns(inputs.masks, MASKS, MASK_COLUMNS), inputs.sources)
    assert work.equals(whole_work) and unmasked.equals(whole_unmasked)
    assert work["frame_id"].to_pylist() == inputs.masked_ids


def test_mask_order_only_matters_across_chunks(tmp_path):
    inputs = make_inputs(tmp_path, n=6)  # masks reversed
    assert _joined(inputs, 6)[0]["frame_id"].to_pylist() == inputs.frame_ids  # one chunk: matched by id
    with pytest.raises(ValueError, match="does not follow .*frames.parquet's order"):
        _joined(inputs, 2)


def test_repeated_mask_rows_are_an_error(tmp_path):
    inputs = masks_in_frames_order(make_inputs(tmp_path, n=4))
    rows = pq.read_table(inputs.masks).to_pylist()
    write_table(inputs.masks, MASKS, rows[:2] + rows[1:])  # next to each other: found inside the chunk
    with pytest.raises(ValueError, match="several rows for frame"):
        _joined(inputs, 4)
    write_table(inputs.masks, MASKS, rows + rows[:1])  # far apart: a row out of order
    with pytest.raises(ValueError, match="does not follow"):
        _joined(inputs, 2)

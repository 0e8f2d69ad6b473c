import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flows import reasons
from flows.embed.encode import encode_pixels
from flows.embed.preprocess import SubjectDataset
from flows.embed.stage import (AccountingError, check_accounting, embed_frames, join_masks, read_columns,
                               FRAME_COLUMNS, MASK_COLUMNS)
from flows.schemas import FRAMES, MASKS, REJECTS, embeddings_schema
from flows.tables import iter_rows
from embed_inputs import embed_params, make_bulky_inputs, make_inputs, masks_in_frames_order


def _embeddings(path):
    table = pq.read_table(path)
    flat = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table, flat.reshape(table.num_rows, -1)


def test_stage_writes_every_frame_once_in_frames_order(tmp_path, tiny_clip):
    inputs = make_inputs(tmp_path / "in", n=9, unmasked=(2, 5), corrupt=(6,))
    out = tmp_path / "out"
    stats = embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip)

    table, emb = _embeddings(out / "embeddings.parquet")
    expected = [f for k, f in enumerate(inputs.frame_ids) if k not in (2, 5, 6)]
    assert table["frame_id"].to_pylist() == expected
    assert table.schema.equals(embeddings_schema(32), check_metadata=False)
    assert table.schema.metadata[b"model_id"] == tiny_clip.model_id.encode()
    assert set(table["model_id"].to_pylist()) == {tiny_clip.model_id}
    assert emb.dtype == np.float16 and emb.shape == (6, 32)
    assert np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    rejects = list(iter_rows(out / "rejects.parquet", REJECTS))
    assert [(r["item_id"], r["reason"], r["stage"]) for r in rejects] == [
        (inputs.frame_ids[2], reasons.MISSING_MASK, "embed"), (inputs.frame_ids[5], reasons.MISSING_MASK, "embed"),
        (inputs.frame_ids[6], reasons.UNREADABLE_IMAGE, "embed")]
    assert stats["count"] + sum(stats["rejected"].values()) == stats["frames_in"] == 9
    assert json.loads((out / "stats.json").read_text())["model_id"] == tiny_clip.model_id
    assert stats["dim"] == 32 and stats["throughput_img_s"] > 0


def test_each_row_is_its_own_frames_embedding(tmp_path, tiny_clip):
    """Order through two worker processes: row k equals frame k embedded on its own."""
    inputs = make_inputs(tmp_path / "in", n=7)
    out = tmp_path / "out"
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out, num_workers=2, batch_size=2),
                 inputs.sources, clip=tiny_clip)
    table, emb = _embeddings(out / "embeddings.parquet")
    assert table["frame_id"].to_pylist() == inputs.frame_ids
    work, _ = join_masks(read_columns(inputs.frames, FRAMES, FRAME_COLUMNS),
                         read_columns(inputs.masks, MASKS, MASK_COLUMNS), inputs.sources)
    dataset = SubjectDataset(work, preprocess=tiny_clip.preprocess, image_size=tiny_clip.image_size,
                             background=embed_params(out).background_rgb)
    alone = torch.cat([encode_pixels(tiny_clip.model, dataset[k].pixels[None]) for k in range(7)]).numpy()
    assert np.abs(alone.astype(np.float32) - emb.astype(np.float32)).max() < 2e-3
    cosines = alone.astype(np.float32) @ emb.astype(np.float32).T  # (7, 7): each row's own frame wins
    assert (cosines.argmax(axis=1) == np.arange(7)).all()


def test_deterministic_bytes(tmp_path, tiny_clip):
    inputs = make_inputs(tmp_path / "in", n=6)
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip)
        runs.append((out / "embeddings.parquet").read_bytes())
    assert runs[0] == runs[1]


def test_duplicate_mask_rows_are_an_error(tmp_path):
    inputs = make_inputs(tmp_path, n=3)
    masks = read_columns(inputs.masks, MASKS, MASK_COLUMNS)
    with pytest.raises(ValueError, match="several rows for frame"):
        join_masks(read_columns(inputs.frames, FRAMES, FRAME_COLUMNS), pa.concat_tables([masks, masks.slice(0, 1)]),
                   inputs.sources)


def test_image_file_follows_the_source_root(tmp_path):
    inputs = make_inputs(tmp_path, n=2)
    work, unmasked = join_masks(read_columns(inputs.frames, FRAMES, FRAME_COLUMNS),
                                read_columns(inputs.masks, MASKS, MASK_COLUMNS), inputs.sources)
    assert unmasked.num_rows == 0
    files = work["image_file"].to_pylist()
    assert files[0].startswith(inputs.sources.mvimgnet_root + "/") and files[0].endswith("/images/000.jpg")
    assert files[1] == f"{inputs.sources.openimages_root}/train/{1:016x}.jpg"


def segment_rejected_file(tmp_path, frame_id):
    """A segment rejects table holding ``frame_id`` (an empty mask)."""
    from flows.accounting import FRAME, reject_row
    from flows.tables import write_table

    path = tmp_path / "segment_rejects.parquet"
    write_table(path, REJECTS, [reject_row(item_id=frame_id, source="mvimgnet", kind=FRAME, path="x",
                                           stage="segment", reason=reasons.EMPTY_MASK, detail="test")])
    return path


def test_segment_rejected_streams_the_cumulative_rejects_and_keeps_segments_own(tmp_path, monkeypatch):
    import functools

    from flows.accounting import FRAME, reject_row
    from flows.embed import stage
    from flows.tables import write_table

    monkeypatch.setattr(stage, "iter_batches", functools.partial(stage.iter_batches, batch_rows=3))  # several batches
    rows = [reject_row(item_id=f"f{i}", source="mvimgnet", kind=FRAME, path="x", stage=stage_name,
                       reason=reasons.EMPTY_MASK if stage_name == "segment" else reasons.BLURRY, detail="")
            for i, stage_name in enumerate(["ingest", "segment", "filter", "filter", "segment", "ingest", "segment"])]
    write_table(tmp_path / "rejects.parquet", REJECTS, rows)
    assert stage.segment_rejected(tmp_path / "rejects.parquet").to_pylist() == ["f1", "f4", "f6"]
    assert stage.segment_rejected(tmp_path / "none.parquet").to_pylist() == []


def test_frames_the_segment_stage_rejected_are_not_counted_twice(tmp_path, tiny_clip):
    inputs = make_inputs(tmp_path / "in", n=5, unmasked=(1, 3))
    segment_rejects = segment_rejected_file(tmp_path, inputs.frame_ids[1])
    out = tmp_path / "out"
    stats = embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip,
                         segment_rejects=segment_rejects)
    rejects = list(iter_rows(out / "rejects.parquet", REJECTS))
    assert [r["item_id"] for r in rejects] == [inputs.frame_ids[3]]  # 1 is segment's, 3 is really missing
    assert stats["rejected_by_segment"] == 1
    assert stats["count"] + sum(stats["rejected"].values()) + stats["rejected_by_segment"] == stats["frames_in"]


def test_every_input_frame_is_counted_once(tmp_path, tiny_clip):
    """frames in = embedded + embed rejects + segment rejects, in the stats and in the tables."""
    from flows.tables import count_rows

    inputs = make_inputs(tmp_path / "in", n=8, unmasked=(1, 3), corrupt=(5,))
    segment_rejects = segment_rejected_file(tmp_path, inputs.frame_ids[1])
    out = tmp_path / "out"
    stats = embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip,
                         segment_rejects=segment_rejects)
    assert (stats["frames_in"], stats["count"], stats["rejected"], stats["rejected_by_segment"]) == (
        8, 5, {reasons.MISSING_MASK: 1, reasons.UNREADABLE_IMAGE: 1}, 1)
    assert count_rows(out / "embeddings.parquet") + count_rows(out / "rejects.parquet") + 1 == 8
    check_accounting(frames_in=stats["frames_in"], embedded=stats["count"], rejected=stats["rejected"],
                     rejected_by_segment=stats["rejected_by_segment"])


def test_check_accounting_raises_when_the_counts_disagree():
    check_accounting(frames_in=10, embedded=6, rejected={"missing_mask": 2, "unreadable_image": 1},
                     rejected_by_segment=1)
    for embedded, rejected, by_segment in ((5, {"missing_mask": 2, "unreadable_image": 1}, 1),  # one lost
                                           (6, {"missing_mask": 2, "unreadable_image": 1}, 2),  # one twice
                                           (6, {"missing_mask": 3}, 0)):
        with pytest.raises(AccountingError, match="10 input frames"):
            check_accounting(frames_in=10, embedded=embedded, rejected=rejected, rejected_by_segment=by_segment)


def test_a_frame_lost_between_loader_and_writer_fails_the_stage(tmp_path, tiny_clip, monkeypatch):
    from flows.embed import stage

    encode = stage._encode

    def drop_last_batch(*args, **kwargs):
        batches = list(encode(*args, **kwargs))
        yield from batches[:-1]

    monkeypatch.setattr(stage, "_encode", drop_last_batch)
    inputs = make_inputs(tmp_path / "in", n=5)
    out = tmp_path / "out"
    with pytest.raises(AccountingError, match="5 input frames != 4 embedded"):
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out, batch_size=1), inputs.sources,
                     clip=tiny_clip)
    assert not (out / "stats.json").exists()


def test_chunks_of_any_size_give_the_same_bytes(tmp_path, tiny_clip):
    inputs = masks_in_frames_order(make_inputs(tmp_path / "in", n=10, unmasked=(1, 6), corrupt=(4,)))
    outputs = []
    for chunk_rows in (2, 3, 4096):  # batches of 3 cross the chunks' edges
        out = tmp_path / f"chunks{chunk_rows}"
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip,
                     chunk_rows=chunk_rows)
        outputs.append([(out / name).read_bytes() for name in ("embeddings.parquet", "rejects.parquet")])
    assert outputs[0] == outputs[1] == outputs[2]


def test_batches_cut_into_worker_pieces_give_the_same_bytes(tmp_path, tiny_clip, monkeypatch):
    """Each batch reaches the loader's workers in pieces of WORKER_ROWS rows and is joined again before the
    forward: the pieces (a batch of 5 in 2 + 2 + 1, or whole) change nothing in what is written, nor
    does how many batches are queued on the device before the oldest is read back."""
    from flows.embed import encode, stage

    inputs = make_inputs(tmp_path / "in", n=12, unmasked=(3,), corrupt=(8,))
    outputs = []
    for rows, ahead in ((2, 2), (1000, 2), (2, 0), (2, 5)):  # ahead: batches launched before the oldest is read
        monkeypatch.setattr(stage, "WORKER_ROWS", rows)
        monkeypatch.setattr(encode, "LAUNCHED_AHEAD", ahead)
        out = tmp_path / f"pieces{rows}-{ahead}"
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out, num_workers=2, batch_size=5),
                     inputs.sources, clip=tiny_clip)
        outputs.append([(out / name).read_bytes() for name in ("embeddings.parquet", "rejects.parquet")])
    assert outputs[0] == outputs[1] == outputs[2] == outputs[3]


def test_masks_out_of_frames_order_fail_before_anything_is_written(tmp_path, tiny_clip):
    inputs = make_inputs(tmp_path / "in", n=6)  # masks reversed: fine within one chunk, not across
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not follow"):
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip,
                     chunk_rows=2)
    assert not any(out.iterdir())


# Runs the stage on two inputs in one fresh process, the small one first: peak memory is a
# high-water mark, so the second peak shows what the larger input added.
_PEAKS = """
import json, resource, sys
from pathlib import Path
import pyarrow as pa
from flows.config.params import EmbedParams, SourcesParams
from flows.embed.clip_model import TINY_MODEL, ClipSpec, load_clip
from flows.embed.stage import embed_frames

clip = load_clip(ClipSpec(TINY_MODEL, None), device="cpu")
peaks = []
for root in map(Path, sys.argv[1:]):
    sources = SourcesParams(mvimgnet_root=str(root / "mvimgnet"), openimages_root=str(root / "openimages"))
    params = EmbedParams(out_dir=str(root / "out"), batch_size=64, num_workers=0)
    stats = embed_frames(root / "frames.parquet", root / "masks.parquet", root / "out", params, sources,
                         device="cpu", clip=clip, chunk_rows=128)
    peaks.append({"rejected": stats["rejected"], "arrow": pa.default_memory_pool().max_memory(),
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
print(json.dumps(peaks))
"""


def test_memory_stays_flat_as_the_input_grows(tmp_path):
    """5x the frames, 250 MiB more RLE: the stage's peak memory stays where it was.

    Holding the tables (as the stage once did) adds about 3x the extra RLE to both Arrow's
    peak and the RSS (+750 MB here); streaming adds nothing to Arrow's peak and 10-35 MB of
    heap fragmentation to the RSS, so the RSS bound is loose: it catches a table held as
    Python objects, and Arrow's exact peak catches one held as Arrow.
    """
    rle_bytes, sizes = 64 * 1024, (1000, 5000)
    roots = [tmp_path / str(n) for n in sizes]
    for root, n in zip(roots, sizes):
        make_bulky_inputs(root, n=n, rle_bytes=rle_bytes)
    done = subprocess.run([sys.executable, "-c", _PEAKS, *map(str, roots)], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    small, large = json.loads(done.stdout.splitlines()[-1])
    assert [small["rejected"], large["rejected"]] == [{"missing_file": n} for n in sizes]
    extra = (sizes[1] - sizes[0]) * rle_bytes
    assert large["arrow"] < 0.5 * sizes[1] * rle_bytes  # never the whole masks table
    assert large["arrow"] - small["arrow"] < 0.05 * extra
    assert large["rss"] - small["rss"] < 0.5 * extra


def test_a_failed_run_keeps_its_finished_parts_and_the_rerun_embeds_only_the_rest(tmp_path, tiny_clip, monkeypatch):
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=14, unmasked=(2,), corrupt=(9,))  # 13 work rows: parts of 6, 6, 1
    clean = tmp_path / "clean"
    embed_frames(inputs.frames, inputs.masks, clean, embed_params(clean), inputs.sources, clip=tiny_clip,
                 part_rows=5)  # rounded up to 2 batches of 3
    out = tmp_path / "out"
    real_write, written = stage._Part.write, []

    def dies_in_the_second_part(part, batch, frames, model_id):
        if part.index == 1 and len(written) == 2:  # the third batch: part 0 is finished
            raise RuntimeError("the machine went away")
        written.append(int(batch.indices[0]))
        return real_write(part, batch, frames, model_id)

    monkeypatch.setattr(stage._Part, "write", dies_in_the_second_part)
    with pytest.raises(RuntimeError, match="went away"):
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip, part_rows=5)
    assert sorted(p.name for p in (out / ".work").glob("*.done.json")) == ["part-00000.done.json"]
    assert not (out / "embeddings.parquet").exists() and not (out / "stats.json").exists()
    written.clear()
    monkeypatch.setattr(stage._Part, "write", lambda part, batch, frames, model_id: (
        written.append(int(batch.indices[0])), real_write(part, batch, frames, model_id))[1])
    stats = embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip,
                         part_rows=5)
    assert written == [6, 9, 12]  # the batches of the unfinished parts only
    for name in ("embeddings.parquet", "rejects.parquet", "stats.json"):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert stats["count"] == 12 and stats["rejected"] == {"missing_mask": 1, "unreadable_image": 1}
    assert not (out / ".work").exists()


def _fail_in_the_second_part(inputs, out, clip, monkeypatch, part_rows=3):
    """A run (parts of 3 rows) that dies in part 1, part 0 finished; the stage works again afterwards."""
    from flows.embed import stage

    real_write = stage._Part.write

    def dies_in_the_second_part(part, *args):
        if part.index == 1:
            raise RuntimeError("stop")
        return real_write(part, *args)

    with monkeypatch.context() as patched:
        patched.setattr(stage._Part, "write", dies_in_the_second_part)
        with pytest.raises(RuntimeError):
            embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=clip,
                         part_rows=part_rows)


def test_work_of_another_model_or_params_is_not_resumed(tmp_path, tiny_clip, monkeypatch):
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=8)
    out = tmp_path / "out"
    _fail_in_the_second_part(inputs, out, tiny_clip, monkeypatch)
    seen = []
    monkeypatch.setattr(stage._Part, "finish", lambda part, work, real=stage._Part.finish: (
        seen.append(part.index), real(part, work))[1])
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out, background_rgb=[0, 0, 0]), inputs.sources,
                 clip=tiny_clip, part_rows=3)
    assert seen[0] == 0  # another key: part 0 was embedded again


def test_a_finished_part_cut_short_on_disk_is_embedded_again(tmp_path, tiny_clip, monkeypatch):

    inputs = make_inputs(tmp_path / "in", n=8)
    clean = tmp_path / "clean"
    embed_frames(inputs.frames, inputs.masks, clean, embed_params(clean), inputs.sources, clip=tiny_clip, part_rows=3)
    out = tmp_path / "out"
    _fail_in_the_second_part(inputs, out, tiny_clip, monkeypatch)
    (out / ".work" / "part-00000.embeddings.parquet").write_bytes(b"")  # its record survived a power cut; it did not
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip, part_rows=3)
    assert (out / "embeddings.parquet").read_bytes() == (clean / "embeddings.parquet").read_bytes()


def test_the_output_has_the_same_row_groups_however_its_rows_came(tmp_path, tiny_clip, monkeypatch):
    """The output is written as the batches come, a resumed run first copying its finished parts in:
    row groups of exactly ROW_GROUP_ROWS (here 4) make the bytes a fresh run's, whatever the batch
    and part boundaries (batches of 3, parts of 6, a reject inside)."""
    import pyarrow.parquet as pq

    from flows import tables

    monkeypatch.setattr(tables, "ROW_GROUP_ROWS", 4)  # FixedRowGroups reads it there
    inputs = make_inputs(tmp_path / "in", n=14, unmasked=(2,), corrupt=(9,))  # 12 embedded
    clean = tmp_path / "clean"
    embed_frames(inputs.frames, inputs.masks, clean, embed_params(clean), inputs.sources, clip=tiny_clip,
                 part_rows=5)
    file = pq.ParquetFile(clean / "embeddings.parquet")
    assert [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)] == [4, 4, 4]
    out = tmp_path / "out"
    _fail_in_the_second_part(inputs, out, tiny_clip, monkeypatch, part_rows=5)
    assert not (out / "embeddings.parquet").exists()
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip, part_rows=5)
    assert (out / "embeddings.parquet").read_bytes() == (clean / "embeddings.parquet").read_bytes()


def test_while_it_runs_the_stage_writes_nothing_beside_its_work_folder(tmp_path, tiny_clip, monkeypatch):
    """A run killed outright (SIGKILL, the OOM killer) must leave no temporary file where DVC and git
    look: the output is made in the work folder and moved into place at the end."""
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=8)
    out = tmp_path / "out"
    real_write, seen = stage._Part.write, []

    def looks_around(part, *args):
        seen.append(sorted(p.name for p in out.iterdir()))
        return real_write(part, *args)

    monkeypatch.setattr(stage._Part, "write", looks_around)
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip, part_rows=3)
    assert seen and all(names == [".work"] for names in seen), seen


def test_a_killed_runs_partial_output_is_removed_when_the_work_resumes(tmp_path, tiny_clip, monkeypatch):
    """SIGKILL leaves the output's temporary file in the work folder (up to the whole output); the
    resumed run deletes it before writing its own, so the disk holds one partial output, not two."""
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=8)
    out = tmp_path / "out"
    _fail_in_the_second_part(inputs, out, tiny_clip, monkeypatch)
    stale = out / ".work" / ".output.embeddings.parquet.1234.abcdef012345.tmp"
    stale.write_bytes(b"PAR1 half a table")
    real_write, seen = stage._Part.write, []

    def looks(part, *args):
        seen.append(stale.exists())
        return real_write(part, *args)

    monkeypatch.setattr(stage._Part, "write", looks)
    embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip, part_rows=3)
    assert seen and not any(seen)


def test_no_output_table_unless_both_are_written(tmp_path, tiny_clip, monkeypatch):
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=6)
    out = tmp_path / "out"

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(stage, "concat_tables", disk_full)
    with pytest.raises(OSError, match="disk full"):
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip)
    assert sorted(p.name for p in out.iterdir()) == [".work"]


def test_rows_lost_on_the_way_to_the_output_fail_the_run(tmp_path, tiny_clip, monkeypatch):
    """The output is a second write path beside the parts: its rows are counted against theirs."""
    from flows.accounting import AccountingError
    from flows.embed import stage

    inputs = make_inputs(tmp_path / "in", n=8)
    out = tmp_path / "out"
    real_write, dropped = stage.FixedRowGroups.write, []

    def loses_one_batch(writer, batch):
        if writer.path.name.startswith("output") and not dropped:
            dropped.append(batch.num_rows)
            return None
        return real_write(writer, batch)

    monkeypatch.setattr(stage.FixedRowGroups, "write", loses_one_batch)
    with pytest.raises(AccountingError, match="rows in the output"):
        embed_frames(inputs.frames, inputs.masks, out, embed_params(out), inputs.sources, clip=tiny_clip)
    assert dropped and not (out / "embeddings.parquet").exists()


def test_steady_rate_leaves_out_the_start_up_and_the_drain():
    """timing.json: the time to the first batch (workers starting, first pieces), and the rate from the
    first batch to the last one handed back before the drain (the batches still queued on the device
    when the input ends come back together), what a long run sees."""
    from flows.embed.stage import _SteadyRate

    ticks = iter([1.0, 2.0, 3.0, 3.1, 3.2])  # a loader-bound run: the last two batches drain at once
    steady = _SteadyRate(lambda: next(ticks), drained=2)
    for rows in (4, 4, 2, 4, 4):
        steady.batch_done(rows)
    assert steady.summary(0.0) == {"first_batch_s": 1.0, "steady_img_s": 3.0}  # (4 + 2) rows in 2 s
    ticks = iter([1.0, 2.0, 3.0])
    no_drain = _SteadyRate(lambda: next(ticks), drained=0)
    for rows in (4, 4, 2):
        no_drain.batch_done(rows)
    assert no_drain.summary(0.0) == {"first_batch_s": 1.0, "steady_img_s": 3.0}
    one = _SteadyRate(lambda: 5.0, drained=2)
    one.batch_done(4)
    assert one.summary(4.5) == {"first_batch_s": 0.5, "steady_img_s": None}
    assert _SteadyRate(lambda: 0.0, drained=2).summary(0.0) == {}

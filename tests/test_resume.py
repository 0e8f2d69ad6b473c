import json

from flows.config.params import SegmentParams
from flows.resume import ResumableWork, work_key


def test_the_key_follows_input_bytes_and_params(tmp_path):
    table = tmp_path / "frames.parquet"
    table.write_bytes(b"one")
    key = work_key(inputs=[table], params={"segment": SegmentParams()})
    assert key == work_key(inputs=[table], params={"segment": SegmentParams()})
    assert key != work_key(inputs=[table], params={"segment": SegmentParams(batch_images=8)})
    table.write_bytes(b"two")
    assert key != work_key(inputs=[table], params={"segment": SegmentParams()})


def test_pieces_survive_only_under_the_same_key(tmp_path):
    work = ResumableWork(tmp_path / ".work", "k1")
    assert work.open() == 0 and work.done("shard-0") is None
    (work.folder / "shard-0.parquet").write_bytes(b"part")
    work.mark_done("shard-0", {"counters": {"provided": 3}})
    again = ResumableWork(tmp_path / ".work", "k1")
    assert again.open() == 1 and again.done("shard-0") == {"counters": {"provided": 3}}
    other = ResumableWork(tmp_path / ".work", "k2")
    assert other.open() == 0 and not (other.folder / "shard-0.parquet").exists()
    assert json.loads((other.folder / "key.json").read_text()) == {"key": "k2"}
    other.finish()
    assert not other.folder.exists()


def test_a_damaged_key_file_starts_afresh(tmp_path):
    (tmp_path / ".work").mkdir()
    (tmp_path / ".work" / "key.json").write_text("{not json")
    (tmp_path / ".work" / "stale.done.json").write_text("{}")
    work = ResumableWork(tmp_path / ".work", "k")
    assert work.open() == 0 and not (tmp_path / ".work" / "stale.done.json").exists()

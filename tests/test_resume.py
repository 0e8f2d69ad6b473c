import json

from flows.config.params import SegmentParams
from flows.resume import ResumableWork, device_identity, file_identity, work_key
from flows.schemas import REJECTS
from flows.tables import write_table


def _rows(n):
    return [{"item_id": f"x{i}", "source": "mvimgnet", "item_kind": "frame", "path": None, "stage": "ingest",
             "reason": "empty_file", "detail": ""} for i in range(n)]


def test_the_key_follows_input_bytes_params_and_the_named_code(tmp_path):
    table = tmp_path / "frames.parquet"
    table.write_bytes(b"one")

    def key(**over):
        return work_key(**{"inputs": [table], "params": {"segment": SegmentParams()}, "code": ["segment"], **over})

    first = key()
    assert first == key()
    assert first != key(params={"segment": SegmentParams(batch_images=8)})
    assert first != key(code=["embed"])  # another stage's code
    table.write_bytes(b"two")
    assert first != key()


def test_pieces_survive_only_under_the_same_key(tmp_path):
    work = ResumableWork(tmp_path / ".work", "k1")
    assert work.open() == 0 and work.done("shard-0") is None
    write_table(work.folder / "shard-0.parquet", REJECTS, _rows(3))
    work.mark_done("shard-0", {"counters": {"provided": 3}}, files=[work.folder / "shard-0.parquet"])
    again = ResumableWork(tmp_path / ".work", "k1")
    assert again.open() == 1 and again.done("shard-0") == {"counters": {"provided": 3}}
    other = ResumableWork(tmp_path / ".work", "k2")
    assert other.open() == 0 and not (other.folder / "shard-0.parquet").exists()
    assert json.loads((other.folder / "key.json").read_text()) == {"key": "k2"}
    other.finish()
    assert not other.folder.exists()


def test_a_piece_whose_file_was_lost_or_cut_is_done_again(tmp_path):
    work = ResumableWork(tmp_path / ".work", "k")
    work.open()
    for name in ("a", "b", "c"):
        write_table(work.folder / f"{name}.parquet", REJECTS, _rows(4))
        work.mark_done(name, {"n": 4}, files=[work.folder / f"{name}.parquet"])
    (work.folder / "a.parquet").write_bytes(b"")  # a power cut after the record reached the disk
    (work.folder / "b.parquet").unlink()  # cleaned up by hand
    assert work.done("a") is None and work.done("b") is None and work.done("c") == {"n": 4}
    assert not (work.folder / "a.done.json").exists()  # forgotten, so the piece is redone


def test_a_damaged_key_file_starts_afresh(tmp_path):
    (tmp_path / ".work").mkdir()
    (tmp_path / ".work" / "key.json").write_text("{not json")
    (tmp_path / ".work" / "stale.done.json").write_text("{}")
    work = ResumableWork(tmp_path / ".work", "k")
    assert work.open() == 0 and not (tmp_path / ".work" / "stale.done.json").exists()


def test_model_files_are_named_by_size_and_time(tmp_path):
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"12345")
    first = file_identity(weights)
    weights.write_bytes(b"123456")
    assert file_identity(weights) != first and file_identity(tmp_path / "nope.pth").endswith("absent")


def test_a_missing_input_table_is_a_one_line_error(tmp_path):
    import pytest

    from flows.tables import TableReadError

    with pytest.raises(TableReadError, match=r"frames\.parquet: no such file; run the stage that writes it first"):
        work_key(inputs=[tmp_path / "frames.parquet"], params={}, code=[])


def test_device_identity_names_the_cuda_libraries(monkeypatch):
    import torch

    assert device_identity(torch.device("cpu")) == "cpu" == device_identity("cpu")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    first = device_identity(torch.device("cuda", 1))
    assert first == "cuda (CUDA 12.8, cuDNN 91000)"
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 92000)
    assert device_identity(torch.device("cuda")) != first

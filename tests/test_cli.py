import pytest

from flows.cli import run_stage
from flows.tables import TableReadError


def test_a_user_facing_error_ends_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")

    def main(path):
        raise TableReadError("data/embed/embeddings.parquet: no such file; run the stage that writes it first")

    with pytest.raises(SystemExit) as exc:
        run_stage(main, [str(params)])
    assert str(exc.value) == "error: data/embed/embeddings.parquet: no such file; run the stage that writes it first"


def test_a_bad_params_file_fails_before_the_stage_runs(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("similarity:\n  kk: 3\n")
    ran = []
    with pytest.raises(SystemExit, match=r"^error: similarity\.kk: unknown key"):
        run_stage(ran.append, [str(params)])
    assert ran == []


def test_a_bug_keeps_its_traceback(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")

    def main(path):
        raise KeyError("frame_id")

    with pytest.raises(KeyError):
        run_stage(main, [str(params)])

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


def test_the_error_line_is_the_commands_last_line(tmp_path):
    # Prefect's temporary server logs "Stopping temporary server" at exit; the error line comes after it
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text(f"sources:\n  mvimgnet_mask_root: {tmp_path / 'masks-typo'}\n"
                                          "  enabled: [mvimgnet]\n")
    proc = subprocess.run([sys.executable, "-m", "flows.ingest", "params.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root),
                                                       "PREFECT_HOME": str(tmp_path / "prefect")})
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sources.mvimgnet_root:") and "sources.mvimgnet_mask_root:" in last, proc.stderr[-2000:]

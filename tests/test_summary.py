import json

from flows.config.params import FilterParams, Params
from flows.summary import summary_lines


def test_summary_shows_the_accounting(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "mvimgnet": {"discovered": 10, "accepted": 7, "rejected_ingest": 1, "rejected_filter": 2,
                     "reasons": {"ingest/empty_file": 1, "filter/blurry": 2}}}))
    (tmp_path / "frames.parquet").write_bytes(b"")  # the stage's output is there
    lines = summary_lines(Params(filter=FilterParams(out_dir=str(tmp_path))))
    assert lines[1].split() == ["mvimgnet", "10", "7", "1", "2"]
    assert "filter/blurry: 2" in "\n".join(lines)


def test_stats_without_their_output_or_out_of_date_are_not_passed_off_as_current(tmp_path):
    from flows.config.params import EmbedParams, SegmentParams

    seg, emb = tmp_path / "segment", tmp_path / "embed"
    for folder, stats in ((seg, {"masks": 5, "rejected": 1}), (emb, {"count": 4, "rejected": {}})):
        folder.mkdir()
        (folder / "stats.json").write_text(json.dumps(stats))
    (emb / "embeddings.parquet").write_bytes(b"")  # segment's masks.parquet is gone: its last run failed
    params = Params(segment=SegmentParams(out_dir=str(seg)), embed=EmbedParams(out_dir=str(emb)))
    lines = summary_lines(params, changed={"embed"})
    assert "segment: no output (not run yet, or its last run failed)" in lines
    assert "embed: count=4, rejected={}  [out of date: run dvc repro]" in lines
    assert "embed: count=4, rejected={}" in summary_lines(params)


def test_summary_shows_the_training_run(tmp_path):
    from cc_model.config import TrainParams

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "cc_adapter.safetensors").write_bytes(b"")
    (tmp_path / "stats.json").write_text(json.dumps({"steps": 20, "samples": 160,
                                                     "loss_last_steps": {"ldm": 1.1, "total": 2.1}}))
    lines = summary_lines(Params(train=TrainParams(out_dir=str(tmp_path))))
    assert "train: steps=20, samples=160, loss over the last steps: total=2.1" in lines


def test_summary_shows_the_evaluation(tmp_path):
    from cc_model.config import EvaluateParams

    (tmp_path / "scores.parquet").write_bytes(b"")
    (tmp_path / "stats.json").write_text(json.dumps({"images": 104, "CT": 0.31, "R-CI": 0.9, "E-CI": 0.8,
                                                     "R-DI": 0.7, "E-DI": 0.6, "random_weights": False}))
    lines = summary_lines(Params(evaluate=EvaluateParams(out_dir=str(tmp_path))))
    assert "evaluate: images=104, CT=0.31, R-CI=0.9, E-CI=0.8, R-DI=0.7, E-DI=0.6, random_weights=False" in lines


def test_stages_downstream_of_a_changed_one_are_out_of_date_too(tmp_path, monkeypatch):
    # dvc status names only the stage whose own inputs changed; the ones that read its outputs rerun too
    import os
    import subprocess
    import sys

    import yaml

    from flows.summary import dvc_changed_stages

    write = "python -c \"import sys, pathlib; pathlib.Path(sys.argv[2]).write_text(pathlib.Path(sys.argv[1]).read_text())\""
    stages = {"a": {"cmd": f"{write} in.txt a.txt", "deps": ["in.txt"], "outs": ["a.txt"]},
              "b": {"cmd": f"{write} a.txt b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
              "c": {"cmd": f"{write} b.txt c.txt", "deps": ["b.txt"], "outs": ["c.txt"]},
              "other": {"cmd": f"{write} in2.txt o.txt", "deps": ["in2.txt"], "outs": ["o.txt"]}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "in.txt").write_text("1")
    (tmp_path / "in2.txt").write_text("1")
    (tmp_path / "raw.txt").write_text("data a user tracks with dvc add")  # a .dvc-file stage has no name
    monkeypatch.setenv("PATH", f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "raw.txt"], ["dvc", "repro", "-q"]):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    assert dvc_changed_stages(tmp_path) == set()
    (tmp_path / "in.txt").write_text("2")
    assert dvc_changed_stages(tmp_path) == {"a", "b", "c"}

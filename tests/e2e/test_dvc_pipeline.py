"""End to end: `dvc repro` of sample -> ingest -> filter in a temporary copy of the project.

Checks what a data engineer relies on: every planted fault is rejected with its own
reason, the counts add up per source, a second repro does nothing, and a filter threshold
change invalidates only the filter stage.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.schemas import FRAMES, REJECTS
from flows.tables import iter_rows

ROOT = Path(__file__).resolve().parents[2]
SMALL_SAMPLE = {"n_objects": 6, "n_views": 6, "n_openimages_boxes": 14, "n_dreambench_subjects": 2,
                "dreambench_images_per_subject": 2}


def run(cmd: list[str], cwd: Path) -> str:
    from prefect.settings import PREFECT_API_URL

    # Stage processes talk to the session's test server instead of each starting its own.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PREFECT_HOME=str(cwd / ".prefect"), PREFECT_API_URL=PREFECT_API_URL.value() or "")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_harness) -> Path:
    """A git + DVC copy of the project with a smaller sample, after one `dvc repro`."""
    work = tmp_path_factory.mktemp("project")
    for name in ("flows", "dvc.yaml", ".dvc", ".dvcignore"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, work / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"].update(SMALL_SAMPLE)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["dvc", "repro"], work)
    return work


def test_planted_faults_rejected_with_their_reasons(project):
    faults = json.loads((project / "data/sample/faults.json").read_text())
    assert len({f["reason"] for f in faults}) >= 8
    rejects = list(iter_rows(project / "data/filter/rejects.parquet", REJECTS))
    found = {(r["source"], r["path"], r["stage"], r["reason"]) for r in rejects}
    for fault in faults:
        key = (fault["source"], fault["path"], fault["stage"], fault["reason"])
        assert key in found, f"planted fault {fault} not rejected as expected"
    accepted = {(f["source"], f["image_path"]) for f in iter_rows(project / "data/filter/frames.parquet", FRAMES)}
    for fault in faults:
        if fault["reason"] != "path_outside_root":  # that fault is a CSV row; its box is fine
            assert (fault["source"], fault["path"]) not in accepted


def test_counts_add_up_per_source(project):
    metrics = json.loads((project / "data/filter/metrics.json").read_text())
    for source in ("mvimgnet", "openimages"):
        m = metrics[source]
        assert m["discovered"] > 0 and m["accepted"] > 0
        assert m["discovered"] == m["accepted"] + m["rejected_ingest"] + m["rejected_filter"]
        assert sum(m["reasons"].values()) == m["rejected_ingest"] + m["rejected_filter"]
    frames = list(iter_rows(project / "data/filter/frames.parquet", FRAMES))
    assert len(frames) == metrics["total"]["accepted"]
    assert len({f["frame_id"] for f in frames}) == len(frames)


def test_second_repro_changes_nothing(project):
    out = run(["dvc", "repro"], project)
    assert "Data and pipelines are up to date" in out


def test_threshold_change_invalidates_only_filter(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["filter"]["min_blur_score"] = 41.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], project))
        assert set(status) == {"filter"}
    finally:
        params_path.write_text(original)

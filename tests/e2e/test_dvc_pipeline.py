"""End to end: `dvc repro` of every stage, sample to report, in a temporary copy of the project.

Checks what a data engineer relies on: every planted fault is rejected with its own
reason, the counts add up per source, pairs and masks agree with the sample's ground truth,
a second repro does nothing, and a params change invalidates only the stages that read it.
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

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flows.pairs.join import iter_embeddings
from flows.readers.colmap import angle_between_views, read_images_binary
from flows.schemas import EXPORT, FRAMES, MASKS, PAIRS, REJECTS
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
    for name in ("flows", "cc_model", "dvc.yaml", ".dvc", ".dvcignore"):
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
    # filter: discovered = accepted + rejected; later stages: input = output + their rejects
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


@pytest.mark.parametrize("section,key,value", [
    ("filter", "min_blur_score", 41.0),
    ("embed", "model", "ViT-B-32"),
    ("train", "lr", 1.0e-4),
])
def test_params_change_invalidates_only_what_reads_it(project, section, key, value):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(run(["dvc", "status", "--json"], project))
        # Only the stage that reads the key is stale (and check_params, which validates the
        # whole file on every change and writes nothing); the stages after it rerun once its
        # outputs change (DVC compares their input hashes), the stages before it never do.
        assert set(status) == {section, "check_params"}
    finally:
        params_path.write_text(original)


def test_a_misspelt_key_that_no_stage_reads_fails_dvc_repro(project):
    params_path = project / "params.yaml"
    original = params_path.read_text()
    params_path.write_text(original + "model_typo: 1\n")
    try:
        proc = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"))
        assert proc.returncode != 0 and "error: model_typo: unknown key" in proc.stdout + proc.stderr
    finally:
        params_path.write_text(original)
        run(["dvc", "repro", "check_params"], project)  # valid again: nothing stale is left for the next tests


def test_pairs_are_same_object_views_at_least_the_threshold_apart(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    root = project / params["sources"]["mvimgnet_root"]
    frames = {f["frame_id"]: f for f in iter_rows(project / "data/filter/frames.parquet", FRAMES)}
    pairs = list(iter_rows(project / "data/pairs/pairs.parquet", PAIRS))
    multiview = [p for p in pairs if p["kind"] == "multiview"]
    assert multiview and any(p["kind"] == "augmentation" for p in pairs)
    poses = {}
    for p in multiview:
        ref, pos = frames[p["frame_id"]], frames[p["positive_frame_id"]]
        assert ref["subject_id"] == pos["subject_id"] == p["subject_id"]
        class_id, object_id = ref["subject_id"].split(":")[1].split("/")
        if (class_id, object_id) not in poses:  # the ground truth: the render poses in COLMAP files
            model = read_images_binary(root / class_id / object_id / "sparse/0/images.bin")
            poses[class_id, object_id] = {pose.name: pose for pose in model.values()}
        truth = poses[class_id, object_id]
        angle = angle_between_views(truth[ref["image_path"].rsplit("/", 1)[1]], truth[pos["image_path"].rsplit("/", 1)[1]])
        assert angle >= params["pairs"]["min_angle_deg"] - 1e-3
        assert p["angle_deg"] == pytest.approx(angle, abs=1e-2)


def test_r_ij_exists_for_every_pair_and_agrees_with_embeddings(project):
    embeddings = dict(iter_embeddings(project / "data/embed/embeddings.parquet"))
    for p in iter_rows(project / "data/pairs/pairs.parquet", PAIRS):
        other = p["positive_frame_id"] or p["frame_id"]
        r = float(np.dot(embeddings[p["frame_id"]].astype(np.float32), embeddings[other].astype(np.float32)))
        assert p["r_ij"] is not None and abs(p["r_ij"] - r) < 1e-3


def test_provided_masks_equal_ground_truth_and_tiny_sam_ran(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    frames = {f["frame_id"]: f for f in iter_rows(project / "data/filter/frames.parquet", FRAMES)}
    methods = set()
    for m in iter_rows(project / "data/segment/masks.parquet", MASKS):
        methods.add(m["method"])
        if m["method"] != "provided":
            continue
        frame = frames[m["frame_id"]]
        root = params["sources"]["mvimgnet_mask_root" if frame["source"] == "mvimgnet" else "openimages_root"]
        truth = Image.open(project / root / frame["mask_path"])
        truth = truth.getchannel("A") if truth.mode == "RGBA" else truth.convert("L")  # a cutout's mask is its alpha
        # OpenImages masks are stored smaller: nearest-neighbour resize, pixel centres aligned
        truth = np.asarray(truth.resize((m["width"], m["height"]), Image.NEAREST)) > 127
        decoded = mask_utils.decode({"size": [m["height"], m["width"]], "counts": m["rle_counts"]}).astype(bool)
        assert np.array_equal(decoded, truth), m["frame_id"]
    assert methods == {"provided", "sam_box"}  # OpenImages boxes without a mask go through (tiny) SAM
    stats = json.loads((project / "data/segment/stats.json").read_text())
    assert stats["sam"]["random_weights"] is True


def test_export_shards_cover_every_pair(project):
    pairs = {p["pair_id"] for p in iter_rows(project / "data/pairs/pairs.parquet", PAIRS)}
    rows = [r for split in ("train", "heldout") for path in sorted((project / "data/export" / split).glob("*.parquet"))
            for r in iter_rows(path, EXPORT)]
    assert {r["sample_id"] for r in rows} == pairs and len(rows) == len(pairs)
    # every embedded frame is a training reference or a pairs reject (no positive), never both
    embedded = {frame_id for frame_id, _ in iter_embeddings(project / "data/embed/embeddings.parquet")}
    unpaired = {r["item_id"] for r in iter_rows(project / "data/pairs/rejects.parquet", REJECTS)}
    references = {r["frame_id"] for r in rows}
    assert references | unpaired == embedded and not references & unpaired
    assert json.loads((project / "data/export/stats.json").read_text())["reference_frames"] == len(references)
    assert (project / "data/report/report.md").is_file() and (project / "data/report/pairs.png").is_file()


def test_train_stage_leaves_a_loadable_checkpoint_and_its_curve(project):
    from cc_model.checkpoint import load_model

    params = yaml.safe_load((project / "params.yaml").read_text())
    out = project / params["train"]["out_dir"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == params["train"]["max_steps"]
    assert stats["samples"] == params["train"]["max_steps"] * params["train"]["batch_size"]
    model = load_model(out / "checkpoint")  # the tiny profile's backbones, from the saved config
    assert set(model.trainable_state_dict()) == set(model.trainable_named_parameters())
    curve = (out / "loss.csv").read_text().splitlines()
    assert len(curve) == 1 + params["train"]["max_steps"] and curve[0].startswith("step,")


def test_evaluate_scores_every_dreambench_prompt(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    stats = json.loads((project / params["evaluate"]["out_dir"] / "stats.json").read_text())
    per_subject = 1 + 25  # the reconstruction prompt and DreamBench's 25 prompts of its kind
    expected = SMALL_SAMPLE["n_dreambench_subjects"] * per_subject * params["evaluate"]["images_per_prompt"]
    assert stats["images"] == expected and stats["subjects"] == SMALL_SAMPLE["n_dreambench_subjects"]
    assert stats["random_weights"] is True and -1 <= stats["CT"] <= 1 and set(stats["by_category"]) >= {"scene"}

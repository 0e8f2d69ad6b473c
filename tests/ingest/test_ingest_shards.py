"""Ingest of hand-made edge cases, through the plain functions (no Prefect)."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows import reasons
from flows.config.params import SourcesParams
from flows.ingest import mvimgnet, openimages
from flows.ingest.records import ShardOutput
from flows.readers import colmap
from flows.schemas import FRAMES, REJECTS
from flows.tables import concat_tables, iter_rows

BOX_HEADER = "ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside\n"
SEG_HEADER = "MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks\n"


def jpeg(seed: int, size=(320, 240)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_mask(size, box) -> bytes:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def run_shards(module, sources, tmp_path, specs):
    frames, rejects = [], []
    for i, spec in enumerate(specs):
        out = module.ingest_shard(spec, sources, probe_side=128,
                                  out=ShardOutput(tmp_path / f"f{i}.parquet", tmp_path / f"r{i}.parquet"))
        frames += list(iter_rows(out.frames, FRAMES))
        rejects += list(iter_rows(out.rejects, REJECTS))
    return frames, rejects


@pytest.fixture
def oi_sources(tmp_path):
    root = tmp_path / "oi"
    (root / "train").mkdir(parents=True)
    (root / "masks" / "a").mkdir(parents=True)
    (root / "train" / "a000000000000001.jpg").write_bytes(jpeg(1))
    (root / "train" / "a000000000000002.jpg").write_bytes(b"")
    (root / "masks" / "a" / "a000000000000001_m01_00000001.png").write_bytes(png_mask((160, 120), (40, 30, 120, 90)))
    (root / "classes.csv").write_text('LabelName,DisplayName\n/m/01,"Cup, mug"\n')
    (root / "boxes.csv").write_text(
        BOX_HEADER
        + "a000000000000001,xclick,/m/01,1,0.25,0.75,0.25,0.75,0,0,0,0,0\n"
        + "a000000000000001,xclick,/m/01,1,0.25,0.75,0.25,0.75,0,0,0,0,0\n"  # the same box twice
        + "a000000000000001,xclick,/m/99,1,0.1,0.2,0.1,0.2,0,0,1,0,0\n"  # label not in classes
        + "a000000000000002,xclick,/m/01,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n"  # zero-byte image
        + "a000000000000003,xclick,/m/01,1,0.1,0.9,0.1,0.9,0,0,0,0,0\n"  # image absent
        + "a000000000000004,xclick,/m/01,1,0.9,0.1,0.1,0.9,0,0,0,0,0\n")  # xmin > xmax
    (root / "seg.csv").write_text(
        SEG_HEADER
        + "a000000000000001_m01_00000001.png,a000000000000001,/m/01,00000001,0.25,0.75,0.25,0.75,0.9,\n"
        + "../../escape.png,a000000000000001,/m/01,00000002,0.1,0.2,0.3,0.4,0.9,\n"  # no such box, escapes
        + "x.png,a000000000000009,/m/01,00000003,0.1,0.2,0.3,0.4,0.9,\n")  # orphan
    return SourcesParams(openimages_root=str(root), openimages_boxes_csv="boxes.csv",
                         openimages_segmentation_csv="seg.csv", openimages_classes_csv="classes.csv")


def test_openimages_tables_are_the_same_bytes_for_any_shard_size(tmp_path, oi_sources):
    # the filter keeps the earlier copy of a duplicate: "earlier" must not depend on
    # ingest.frames_per_shard, and a sizing knob must not move DVC's hash of the outputs
    root = Path(oi_sources.openimages_root)
    rng = np.random.default_rng(0)
    image_ids = [f"{v:016x}" for v in rng.integers(0, 2**63, 12)] + ["ffffffff00000001", "zz-not-hex", "0123",
                                                                      "01G5", "-x", "7fffffff", "7fffffff0", "8", "85"]
    with open(root / "boxes.csv", "a") as boxes, open(root / "seg.csv", "a") as seg:
        for k, image_id in enumerate(image_ids):
            (root / "train" / f"{image_id}.jpg").write_bytes(jpeg(100 + k))
            for b in range(1 + k % 3):
                boxes.write(f"{image_id},xclick,/m/01,1,0.{b + 1},0.9,0.1,0.9,0,0,0,0,0\n")
            seg.write(f"{image_id}_orphan.png,{image_id},/m/01,00000009,0.1,0.2,0.3,0.4,0.9,\n")
    outputs = set()
    for frames_per_shard in (1, 2, 5, 1000):
        work = tmp_path / f"work{frames_per_shard}"
        work.mkdir()
        parts, csv_rejects = openimages.plan_shards(oi_sources, frames_per_shard=frames_per_shard, work_dir=work)
        outs = [openimages.ingest_shard(part, oi_sources, probe_side=64,
                                        out=ShardOutput(work / f"f{i}.parquet", work / f"r{i}.parquet"))
                for i, part in enumerate(parts)]
        concat_tables([o.frames for o in outs], work / "frames.parquet", FRAMES)
        concat_tables([csv_rejects] + [o.rejects for o in outs], work / "rejects.parquet", REJECTS)
        outputs.add(((work / "frames.parquet").read_bytes(), (work / "rejects.parquet").read_bytes()))
        ordered = [r["frame_id"] for r in iter_rows(work / "frames.parquet", FRAMES)]
        assert ordered == sorted(ordered) and len(ordered) > 20
    assert len(outputs) == 1


def test_openimages_every_row_accounted(tmp_path, oi_sources):
    work = tmp_path / "work"
    work.mkdir()
    parts, csv_rejects = openimages.plan_shards(oi_sources, frames_per_shard=2, work_dir=work)
    assert len(parts) == 3  # ceil(6 box rows / 2)
    frames, rejects = run_shards(openimages, oi_sources, tmp_path, parts)
    rejects += list(iter_rows(csv_rejects, REJECTS))
    frame_rejects = [r for r in rejects if r["item_kind"] == "frame"]
    assert len(frames) + len(frame_rejects) == 6  # every box row
    assert len(frames) == 1
    (frame,) = frames
    assert frame["class_name"] == "Cup, mug" and frame["mask_path"] == "masks/a/a000000000000001_m01_00000001.png"
    assert frame["subject_area_frac"] == pytest.approx(0.25, abs=0.01)  # mask stored at half size
    assert (frame["width"], frame["height"]) == (320, 240)
    by_reason = sorted(r["reason"] for r in frame_rejects)
    assert by_reason == sorted([reasons.BAD_ANNOTATION, reasons.UNKNOWN_CLASS, reasons.EMPTY_FILE,
                                reasons.MISSING_FILE, reasons.BAD_ANNOTATION])
    annotation = sorted(r["reason"] for r in rejects if r["item_kind"] == "annotation")
    assert annotation == [reasons.ORPHAN_MASK, reasons.ORPHAN_MASK]


def test_openimages_repeated_box_row_has_its_own_reject_id(tmp_path, oi_sources):
    work = tmp_path / "work"
    work.mkdir()
    frames, rejects = run_shards(openimages, oi_sources, tmp_path,
                                 openimages.plan_shards(oi_sources, frames_per_shard=100, work_dir=work)[0])
    (kept,) = frames
    (repeat,) = [r for r in rejects if "twice" in r["detail"]]
    assert repeat["item_id"] == kept["frame_id"] + "#repeat1"
    assert kept["frame_id"] not in {r["item_id"] for r in rejects}


def _partition_lines(parts):
    return [part.read_text() for part in parts]


def test_openimages_spill_opens_few_files_and_partitions_as_before(tmp_path, oi_sources, monkeypatch):
    # V7 train at frames_per_shard 256 is 57,000 partitions: they must not be open at once.
    import resource

    root = Path(oi_sources.openimages_root)
    with open(root / "boxes.csv", "a") as csv:
        for i in range(300):
            csv.write(f"b{i:015x},xclick,/m/01,1,0.25,0.75,0.25,0.75,0,0,0,0,0\n")
    plans = {}
    for spill_files in (7, 100_000):  # few buckets; one bucket per partition (the old single pass)
        monkeypatch.setattr(openimages, "SPILL_FILES", spill_files)
        work = tmp_path / f"work{spill_files}"
        work.mkdir()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if spill_files == 7:  # room for the 7 spill files and little else
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 24, hard))
        try:
            parts, _ = openimages.plan_shards(oi_sources, frames_per_shard=1, work_dir=work)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(parts) == 306 and sorted(p.name for p in work.glob("*.jsonl")) == [p.name for p in parts]
        plans[spill_files] = _partition_lines(parts)
    assert plans[7] == plans[100_000]  # the same rows in each partition, in CSV order
    frames, rejects = run_shards(openimages, oi_sources, tmp_path, parts)
    assert len(frames) + sum(r["item_kind"] == "frame" for r in rejects) == 306 - 1  # the bad row: a CSV reject


def test_openimages_path_escape_is_rejected(tmp_path, oi_sources):
    seg = tmp_path / "oi" / "seg.csv"
    seg.write_text(SEG_HEADER + "../../../etc/passwd,a000000000000001,/m/01,00000001,0.25,0.75,0.25,0.75,0.9,\n")
    work = tmp_path / "work"
    work.mkdir()
    parts, _ = openimages.plan_shards(oi_sources, frames_per_shard=100, work_dir=work)
    frames, rejects = run_shards(openimages, oi_sources, tmp_path, parts)
    assert frames[0]["mask_path"] is None  # the box stays, without a mask
    escape = [r for r in rejects if r["reason"] == reasons.PATH_OUTSIDE_ROOT]
    assert len(escape) == 1 and escape[0]["path"] == "../../../etc/passwd"


def test_openimages_image_id_escape_is_rejected(tmp_path, oi_sources):
    root = tmp_path / "oi"
    (tmp_path / "secret.jpg").write_bytes(jpeg(2))  # outside the data root: must never be read
    with open(root / "boxes.csv", "a") as csv:
        csv.write("../../secret,xclick,/m/01,1,0.25,0.75,0.25,0.75,0,0,0,0,0\n")
    work = tmp_path / "work"
    work.mkdir()
    parts, _ = openimages.plan_shards(oi_sources, frames_per_shard=100, work_dir=work)
    frames, rejects = run_shards(openimages, oi_sources, tmp_path, parts)
    assert all("secret" not in f["image_path"] for f in frames)
    (escape,) = [r for r in rejects if r["reason"] == reasons.PATH_OUTSIDE_ROOT]
    assert escape["item_kind"] == "frame" and escape["path"] == "train/../../secret.jpg"
    assert "not a plain file name" in escape["detail"]


def test_mvimgnet_object(tmp_path):
    root, masks = tmp_path / "mv", tmp_path / "masks"
    images = root / "5" / "0000beef" / "images"
    images.mkdir(parents=True)
    (masks / "5" / "0000beef").mkdir(parents=True)
    (root / "cats.txt").write_text("5,teapot\n")
    for i in (1, 2, 3):
        (images / f"00{i}.jpg").write_bytes(jpeg(i))
    (masks / "5" / "0000beef" / "001.jpg.png").write_bytes(png_mask((320, 240), (80, 60, 240, 180)))
    (images / "003.jpg").write_bytes(jpeg(3)[:500])  # truncated
    (images / "005.webp").write_bytes(b"RIFF")  # not an image suffix: a reject, never read
    (images / ".DS_Store").write_bytes(b"\0")  # not an image either: accounted for
    sparse = root / "5" / "0000beef" / "sparse" / "0"
    sparse.mkdir(parents=True)
    poses = [colmap.ImagePose(id=i, qvec=(1.0, 0.0, 0.0, 0.0), tvec=(0.0, 0.0, float(i)), camera_id=1,
                              name=f"00{i}.jpg") for i in (1, 2, 4)]
    colmap.write_images_binary(poses, sparse / "images.bin")
    sources = SourcesParams(mvimgnet_root=str(root), mvimgnet_mask_root=str(masks),
                            mvimgnet_categories=str(root / "cats.txt"))
    work = tmp_path / "work"
    work.mkdir()
    specs = mvimgnet.plan_shards(sources, frames_per_shard=100, work_dir=work)
    frames, rejects = run_shards(mvimgnet, sources, tmp_path, specs)
    assert [f["frame_id"] for f in frames] == ["mvimgnet:5/0000beef/001.jpg", "mvimgnet:5/0000beef/002.jpg"]
    first, second = frames
    assert first["pose_tvec"] == [0.0, 0.0, 1.0] and first["class_name"] == "teapot"
    assert first["subject_area_frac"] == pytest.approx(0.25)
    assert first["mask_largest_cc_frac"] == 1.0
    assert (first["box_xmin"], first["box_ymin"], first["box_xmax"], first["box_ymax"]) == (0.25, 0.25, 0.75, 0.75)
    assert second["mask_path"] is None and second["mask_largest_cc_frac"] is None
    assert sorted((r["path"], r["reason"]) for r in rejects) == [
        ("5/0000beef/images/.DS_Store", reasons.NOT_AN_IMAGE),
        ("5/0000beef/images/003.jpg", reasons.UNREADABLE_IMAGE),
        ("5/0000beef/images/004.jpg", reasons.MISSING_FILE),
        ("5/0000beef/images/005.webp", reasons.NOT_AN_IMAGE),
    ]


def test_mvimgnet_broken_colmap_keeps_frames(tmp_path):
    root = tmp_path / "mv"
    images = root / "5" / "0000beef" / "images"
    images.mkdir(parents=True)
    (images / "001.jpg").write_bytes(jpeg(1))
    (root / "cats.txt").write_text("5,teapot\n")
    sparse = root / "5" / "0000beef" / "sparse" / "0"
    sparse.mkdir(parents=True)
    (sparse / "images.bin").write_bytes(b"\x05\x00\x00")
    sources = SourcesParams(mvimgnet_root=str(root), mvimgnet_mask_root=str(tmp_path / "none"),
                            mvimgnet_categories=str(root / "cats.txt"))
    work = tmp_path / "work"
    work.mkdir()
    frames, rejects = run_shards(mvimgnet, sources, tmp_path,
                                 mvimgnet.plan_shards(sources, frames_per_shard=10, work_dir=work))
    assert len(frames) == 1 and frames[0]["pose_qvec"] is None
    assert [(r["item_kind"], r["reason"]) for r in rejects] == [("annotation", reasons.BAD_ANNOTATION)]
    # a missing model is recorded too: the object's frames are kept the same way, without poses
    (sparse / "images.bin").unlink()
    frames, rejects = run_shards(mvimgnet, sources, tmp_path,
                                 mvimgnet.plan_shards(sources, frames_per_shard=10, work_dir=work))
    assert len(frames) == 1 and frames[0]["pose_qvec"] is None
    assert [(r["item_kind"], r["path"], r["reason"]) for r in rejects] == [
        ("annotation", "5/0000beef/sparse/0/images.bin", reasons.MISSING_FILE)]


def test_mvimgnet_object_without_images_folder_is_accounted(tmp_path):
    # the COLMAP model lists two frames, but the images/ folder is gone: both end in rejects
    root = tmp_path / "mv"
    sparse = root / "5" / "0000dead" / "sparse" / "0"
    sparse.mkdir(parents=True)
    (root / "5" / "stray").mkdir()  # neither images/ nor a model: not an object
    (root / "cats.txt").write_text("5,teapot\n")
    poses = [colmap.ImagePose(id=i, qvec=(1.0, 0.0, 0.0, 0.0), tvec=(0.0, 0.0, 1.0), camera_id=1,
                              name=f"00{i}.jpg") for i in (1, 2)]
    colmap.write_images_binary(poses, sparse / "images.bin")
    sources = SourcesParams(mvimgnet_root=str(root), mvimgnet_mask_root=str(tmp_path / "masks"),
                            mvimgnet_categories=str(root / "cats.txt"))
    work = tmp_path / "work"
    work.mkdir()
    frames, rejects = run_shards(mvimgnet, sources, tmp_path, mvimgnet.plan_shards(sources, frames_per_shard=100,
                                                                                   work_dir=work))
    assert frames == []
    assert sorted((r["path"], r["reason"], r["item_kind"]) for r in rejects) == [
        ("5/0000dead/images/001.jpg", reasons.MISSING_FILE, "frame"),
        ("5/0000dead/images/002.jpg", reasons.MISSING_FILE, "frame")]


def test_an_enabled_source_with_nothing_found_fails_naming_the_root_key():
    from flows.config.params import SourcesParams
    from flows.ingest.flow import EmptySourceError, check_sources

    sources = SourcesParams(mvimgnet_root="/data/mvimgnet-typo")
    found = {"discovered": 44, "kept": 40, "rejected": 4, "reasons": {"blurry": 4}}
    with pytest.raises(EmptySourceError, match=r"^sources\.mvimgnet_root: no mvimgnet frames found under "
                                                r"'/data/mvimgnet-typo' \(expected <class_id>/<object_id>/images"):
        check_sources({"openimages": found}, sources)
    rejected = {"discovered": 44, "kept": 0, "rejected": 44, "reasons": {"missing_file": 40, "empty_file": 4}}
    (warning,) = check_sources({"mvimgnet": found, "openimages": rejected}, sources)
    assert "all 44 frames were rejected, most as missing_file (40)" in warning and "sources.openimages_root" in warning
    assert check_sources({"mvimgnet": found}, SourcesParams(enabled=["mvimgnet"])) == []


def test_the_partition_of_an_image_id_never_decreases_in_string_order():
    ids = sorted(["", "-", "0", "0-", "00", "0000000", "00000000", "000000000", "0123", "01230000", "0123000a", "0129Z",
           "0129ffff", "012:", "012A", "012a", "012g", "012ffffff", "01300000", "7", "8", "80000000", "f", "ffffffff",
           "ffffffffff", "fg", "g", "zz", "~", "0/", "0:", "00000000/", "01234567Z"])
    for n in (1, 2, 7, 1000, 2**20):
        parts = [openimages._partition(i, n) for i in ids]
        assert parts == sorted(parts) and 0 <= min(parts) and max(parts) < n
    assert openimages._partition("80000000abcdef01", 2) == 1 and openimages._partition("7fffffffabcdef01", 2) == 0

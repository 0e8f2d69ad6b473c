"""The reduced sample is in the real on-disk formats, with true poses and clean clean data."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from flows.readers.colmap import angle_between_views, camera_center, read_model
from flows.sample import openimages as oi
from flows.sample.plan import plan_objects
from tests.sample.helpers import (blur_score, clean_mvimgnet_frames, fault_paths, largest_component_share,
                                  mask_levels)


def _objects(root: Path) -> list[Path]:
    return sorted(p for p in (root / "mvimgnet").glob("*/*") if p.is_dir())


def test_mvimgnet_layout(small_sample, small_params):
    objects = _objects(small_sample)
    assert len(objects) == small_params.n_objects
    lines = (small_sample / "mvimgnet" / "mvimgnet_category.txt").read_text().splitlines()
    categories = dict(line.split(",", 1) for line in lines)
    for obj in objects:
        assert obj.parent.name.isdigit() and obj.parent.name in categories
        assert re.fullmatch(r"[0-9a-f]{8}", obj.name)
        frames = sorted(p.name for p in (obj / "images").iterdir())
        assert frames == [f"{i:03d}.jpg" for i in range(1, len(frames) + 1)]
        assert sorted(p.name for p in (obj / "sparse" / "0").iterdir()) == ["cameras.bin", "images.bin", "points3D.bin"]


def test_colmap_holds_the_render_poses(small_sample, small_params):
    plans = {p.object_id: p for p in plan_objects(small_params)}
    for obj in _objects(small_sample):
        cameras, images, points = read_model(obj / "sparse" / "0")
        (camera,) = cameras.values()
        assert camera.model in ("SIMPLE_PINHOLE", "PINHOLE")
        assert (camera.width, camera.height) == (small_params.frame_width, small_params.frame_height)
        assert sorted(img.name for img in images.values()) == sorted(p.name for p in (obj / "images").iterdir())
        k = camera.calibration_matrix()
        xyz = np.array([p.xyz for p in points.values()])  # (P, 3) mesh surface points
        assert len(xyz) > 20
        plan = plans[obj.name]
        radii = [np.linalg.norm(camera_center(img)) for img in images.values()]
        np.testing.assert_allclose(radii, radii[0], rtol=1e-9)  # one orbit around the origin
        ordered = [images[i] for i in sorted(images)]
        el, step = np.radians(plan.render.elevation_deg), 2 * np.pi / plan.n_views
        expected = np.degrees(np.arccos(np.cos(el) ** 2 * np.cos(step) + np.sin(el) ** 2))
        assert angle_between_views(ordered[0], ordered[1]) == pytest.approx(expected, abs=1e-6)
        for img in ordered:
            mask_path = small_sample / "mvimgnet_masks" / obj.parent.name / obj.name / f"{img.name}.png"
            rel = f"{obj.parent.name}/{obj.name}/images/{img.name}"
            if not mask_path.exists() or ("mvimgnet", rel) in fault_paths(small_sample):
                continue
            mask = ndimage.binary_dilation(mask_levels(mask_path) > 127, iterations=2)
            cam = xyz @ img.rotation.T + np.asarray(img.tvec)  # (P, 3)
            uv = cam @ k.T
            uv = uv[:, :2] / uv[:, 2:]  # (P, 2) pixels, centres at +0.5
            col, row = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
            inside = (col >= 0) & (col < camera.width) & (row >= 0) & (row < camera.height)
            assert inside.all()
            # every mesh point projects onto the rendered silhouette: the pose is the render's
            assert mask[row, col].mean() > 0.97, img.name
            # the stored 2D observations are the projections (plus sub-pixel noise)
            ids = img.point3D_ids
            if len(ids):
                proj = np.stack([uv[list(points).index(int(i))] for i in ids])
                assert np.abs(proj - img.xys).max() < 2.0


def test_mvimgnet_masks_and_clean_frames(small_sample, small_params):
    frames = clean_mvimgnet_frames(small_sample)
    assert len(frames) >= 10
    modes = set()
    for image_path, mask_path in frames:
        with Image.open(image_path) as im:
            im.load()
            assert min(im.size) >= 256 and im.size == (small_params.frame_width, small_params.frame_height)
            assert blur_score(im) > 80.0  # filter default min_blur_score is 40
        with Image.open(mask_path) as m:
            assert m.size == im.size
            modes.add(m.mode)
            if m.mode == "RGBA":  # a cutout: the frame's own colours where the subject is
                cutout = np.asarray(m)
                colours = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.int16)
                subject = cutout[..., 3] == 255
                assert np.abs(cutout[..., :3][subject] - colours[subject]).mean() < 8  # JPEG's loss only
        mask = mask_levels(mask_path)
        assert set(np.unique(mask)) <= {0, 255}
        mask = mask > 127
        assert 0.05 <= mask.mean() <= 0.5
        ys, xs = np.nonzero(mask)
        assert 0.5 <= (np.ptp(xs) + 1) / (np.ptp(ys) + 1) <= 2.0
        assert largest_component_share(mask) > 0.9
    assert modes == {"L", "RGBA"}  # both kinds of mask file the readers meet: grayscale and cutout


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_openimages_formats(small_sample, small_params):
    root = small_sample / "openimages"
    header, boxes = _csv(root / oi.BOXES_CSV)
    assert header == oi.BOX_HEADER
    seg_header, segs = _csv(root / oi.SEGMENTATION_CSV)
    assert seg_header == oi.SEG_HEADER
    class_header, classes = _csv(root / oi.CLASSES_CSV)
    assert class_header == ["LabelName", "DisplayName"]
    names = {c["LabelName"]: c["DisplayName"] for c in classes}
    assert any("," in n for n in names.values())
    assert '"Nut, hardware"' in (root / oi.CLASSES_CSV).read_text()
    for b in boxes:
        assert re.fullmatch(r"[0-9a-f]{16}", b["ImageID"]) and b["LabelName"] in names
        assert all(re.fullmatch(r"[01]\.\d{6}", b[c]) for c in ("XMin", "XMax", "YMin", "YMax"))
        assert (root / "train" / f"{b['ImageID']}.jpg").exists()
    box_keys = {(b["ImageID"], b["LabelName"], b["XMin"], b["XMax"], b["YMin"], b["YMax"]) for b in boxes}
    real_segs = [s for s in segs if not s["MaskPath"].startswith("..")]
    assert 0 < len(real_segs) < len(boxes)  # real masks cover a subset of the boxes
    for s in real_segs:
        assert (s["ImageID"], s["LabelName"], s["BoxXMin"], s["BoxXMax"], s["BoxYMin"], s["BoxYMax"]) in box_keys
        assert s["MaskPath"] == f"{s['ImageID']}_{s['LabelName'].replace('/', '')}_{s['BoxID']}.png"
        assert re.fullmatch(r"[0-9a-f]{8}", s["BoxID"])
        image = root / "train" / f"{s['ImageID']}.jpg"
        with Image.open(root / "masks" / s["ImageID"][0] / s["MaskPath"]) as m:
            assert m.mode == "L"
            mask_size = m.size
        if image.stat().st_size:  # the planted empty file has masks but no pixels
            with Image.open(image) as im:
                scale = small_params.openimages_mask_scale
                assert mask_size == (round(im.size[0] * scale), round(im.size[1] * scale)) != im.size


def test_dreambench_layout(small_sample, small_params):
    root = small_sample / "dreambench"
    text = (root / "prompts_and_classes.txt").read_text()
    assert text.startswith("Classes\n\nsubject_name,class\n")
    assert "\nPrompts\n\nObject Prompts\n\nprompt_list = [\n" in text and "\nLive Subject Prompts\n\n" in text
    assert "'a {0} {1} in the jungle'.format(unique_token, class_token)," in text
    subjects = sorted(p.name for p in (root / "dataset").iterdir())
    assert len(subjects) == small_params.n_dreambench_subjects
    for name in subjects:
        assert re.search(rf"^{name},[a-z ]+$", text, re.M)
        files = sorted(p.name for p in (root / "dataset" / name).iterdir())
        assert files == [f"{i:02d}.jpg" for i in range(small_params.dreambench_images_per_subject)]

"""Every planted fault is present, recorded in faults.json and is the only thing wrong with its item."""

from __future__ import annotations

import csv
import itertools
import json
from collections import Counter

import imagehash
import pytest
from PIL import Image

from flows import reasons
from flows.sample import faults, openimages as oi
from tests.sample.helpers import (blur_score, clean_mvimgnet_frames, fault_paths, largest_component_share,
                                  mask_levels)


@pytest.fixture(scope="module")
def records(small_sample):
    return json.loads((small_sample / "faults.json").read_text())


@pytest.fixture(scope="module")
def boxes(small_sample):
    with (small_sample / "openimages" / oi.BOXES_CSV).open(newline="") as f:
        return list(csv.DictReader(f))


def _by_fault(records, name):
    return [r for r in records if r["fault"] == name]


def test_every_fault_is_recorded_once(records, small_params):
    counts = Counter(r["fault"] for r in records)
    assert counts == {**{f: 1 for f in faults.FAULTS}, "too_few_views": 3}
    for r in records:
        assert set(r) == {"fault", "source", "path", "stage", "reason", "frame_id"}
        assert (r["stage"], r["reason"]) == faults.FAULTS[r["fault"]]
        assert r["reason"] in (reasons.INGEST_REASONS if r["stage"] == "ingest" else reasons.FILTER_REASONS)
        assert r["source"] in ("mvimgnet", "openimages")


def test_recorded_paths_exist(records, small_sample):
    seg = (small_sample / "openimages" / oi.SEGMENTATION_CSV).read_text()
    for r in records:
        if r["fault"] == "mask_path_outside_root":
            assert f"\n{r['path']}," in seg
        else:
            assert (small_sample / r["source"] / r["path"]).is_file(), r


def test_ingest_faults(records, small_sample):
    (trunc,) = _by_fault(records, "truncated_jpeg")
    with pytest.raises(OSError):
        with Image.open(small_sample / "mvimgnet" / trunc["path"]) as im:
            im.load()
    (empty,) = _by_fault(records, "empty_file")
    assert (small_sample / "openimages" / empty["path"]).stat().st_size == 0


def test_mvimgnet_filter_faults(records, small_sample):
    def mask_of(rec):
        cls, obj, _, name = rec["path"].split("/")
        return small_sample / "mvimgnet_masks" / cls / obj / f"{name}.png"

    (blurred,) = _by_fault(records, "blurred_frame")
    clean_min = min(blur_score(Image.open(p)) for p, _ in clean_mvimgnet_frames(small_sample))
    assert blur_score(Image.open(small_sample / "mvimgnet" / blurred["path"])) < min(10.0, clean_min / 8)
    (missing,) = _by_fault(records, "missing_mask")
    assert not mask_of(missing).exists()
    (frag,) = _by_fault(records, "fragmented_mask")
    mask = mask_levels(mask_of(frag)) > 127
    assert largest_component_share(mask) < 0.5 and mask.mean() > 0.02
    few = _by_fault(records, "too_few_views")
    objects = {r["path"].rsplit("/", 2)[0] for r in few}
    assert len(objects) == 1
    assert len(list((small_sample / "mvimgnet" / objects.pop() / "images").iterdir())) == 3


def test_openimages_filter_faults(records, small_sample, boxes):
    root = small_sample / "openimages"
    (tiny,) = _by_fault(records, "tiny_subject")
    image_id = tiny["path"].split("/")[1][:-4]
    w, h = Image.open(root / tiny["path"]).size
    sizes = [((float(b["XMax"]) - float(b["XMin"])) * w, (float(b["YMax"]) - float(b["YMin"])) * h)
             for b in boxes if b["ImageID"] == image_id]
    # a box-level fault has its image to itself: the image path names exactly one rejected box
    (size,) = sizes
    assert size[0] * size[1] < 0.01 * w * h and min(size) >= 20
    (group,) = _by_fault(records, "group_of")
    (group_box,) = [b for b in boxes if b["ImageID"] == group["path"].split("/")[1][:-4]]
    assert group_box["IsGroupOf"] == "1" and sum(b["IsGroupOf"] == "1" for b in boxes) == 1
    (dup,) = _by_fault(records, "near_duplicate")
    dup_id = dup["path"].split("/")[1][:-4]
    dup_rows = [{k: v for k, v in b.items() if k != "ImageID"} for b in boxes if b["ImageID"] == dup_id]
    (source_id,) = {b["ImageID"] for b in boxes if b["ImageID"] != dup_id
                    and {k: v for k, v in b.items() if k != "ImageID"} in dup_rows}
    assert source_id < dup_id  # the copy comes second in any sorted scan
    a, b = (Image.open(root / "train" / f"{i}.jpg") for i in (source_id, dup_id))
    assert imagehash.phash(a) - imagehash.phash(b) <= 2
    assert (root / "train" / f"{source_id}.jpg").read_bytes() != (root / "train" / f"{dup_id}.jpg").read_bytes()


def test_clean_openimages_boxes(records, small_sample, boxes):
    root = small_sample / "openimages"
    bad_images = {r["path"] for r in records if r["source"] == "openimages" and r["frame_id"] is None}
    checked = 0
    for b in boxes:
        path = f"train/{b['ImageID']}.jpg"
        if path in bad_images or b["IsGroupOf"] == "1":
            continue
        with Image.open(root / path) as im:
            w, h = im.size
            assert min(w, h) >= 256 and blur_score(im) > 80.0
        bw = (float(b["XMax"]) - float(b["XMin"])) * w
        bh = (float(b["YMax"]) - float(b["YMin"])) * h
        if bw * bh < 0.01 * w * h:
            continue  # the planted tiny subject
        assert min(bw, bh) >= 64 and 0.5 <= bw / bh <= 2.0 and 0.05 <= bw * bh / (w * h) <= 0.5
        assert b["IsTruncated"] == b["IsOccluded"] == b["IsDepiction"] == "0"
        checked += 1
    assert checked >= 4


def test_no_accidental_near_duplicates(small_sample, records):
    planted = {(r["source"], r["path"]) for r in records}
    hashes = {}
    for source, pattern in (("mvimgnet", "*/*/images/*.jpg"), ("openimages", "train/*.jpg")):
        for p in sorted((small_sample / source).glob(pattern)):
            rel = p.relative_to(small_sample / source).as_posix()
            if (source, rel) not in planted:
                hashes[(source, rel)] = imagehash.phash(Image.open(p))
    closest = min(hashes[a] - hashes[b] for a, b in itertools.combinations(hashes, 2))
    assert closest > 4 + 1  # filter.near_duplicate_hamming is 4


def test_clean_masks_exist_for_every_clean_frame(small_sample):
    bad = fault_paths(small_sample)
    for image, mask in clean_mvimgnet_frames(small_sample):
        assert mask.exists(), (image, bad)

"""Mask files and COCO RLE: nearest resize of reduced-size masks, exact round trips."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from flows import reasons
from flows.probe import UnreadableFile
from flows.segment.masks import decode_rle, encode_mask, encode_masks, mask_box, read_mask_file

from segment_fixtures import ellipse_mask, save


def test_full_size_mask_round_trips_exactly(tmp_path):
    truth = ellipse_mask(97, 61, (0.1, 0.2, 0.6, 0.9))
    save(tmp_path / "m.png", truth, "PNG")
    mask = read_mask_file(tmp_path / "m.png", width=97, height=61)
    row = encode_mask(mask)
    assert np.array_equal(decode_rle(row["rle_counts"], width=97, height=61), truth > 127)
    assert row["area_frac"] == pytest.approx((truth > 127).mean())


def test_reduced_size_mask_is_resized_nearest_to_the_image(tmp_path):
    truth = ellipse_mask(120, 80, (0.2, 0.1, 0.9, 0.7))
    small = cv2.resize(truth, (40, 27), interpolation=cv2.INTER_NEAREST)
    save(tmp_path / "m.png", small, "PNG")
    mask = read_mask_file(tmp_path / "m.png", width=120, height=80)
    expected = np.asarray(Image.fromarray(small).resize((120, 80), Image.NEAREST)) > 127  # pixel centres aligned
    assert mask.shape == (80, 120) and np.array_equal(mask, expected)
    assert set(np.unique(mask)) <= {False, True}


def test_bbox_is_cocos_and_mask_box_is_exclusive():
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:9] = True
    row = encode_mask(mask)
    assert (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]) == (3.0, 2.0, 6.0, 3.0)
    assert mask_box(mask) == (3.0, 2.0, 9.0, 5.0)
    assert mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_encode_masks_takes_a_fortran_stack_like_pycocotools():
    rng = np.random.default_rng(0)
    stack = rng.random((13, 17, 3)) > 0.5  # (H, W, N)
    rows = encode_masks(np.asfortranarray(stack.astype(np.uint8)))
    for n, row in enumerate(rows):
        reference = mask_utils.encode(np.asfortranarray(stack[:, :, n].astype(np.uint8)))
        assert row["rle_counts"] == reference["counts"]
        assert np.array_equal(decode_rle(row["rle_counts"], width=17, height=13), stack[:, :, n])


@pytest.mark.parametrize("content, reason", [(None, reasons.MISSING_FILE), (b"", reasons.EMPTY_FILE),
                                             (b"\x89PNG\r\n\x1a\nbroken", reasons.UNREADABLE_MASK)])
def test_unusable_mask_files_name_their_reason(tmp_path, content, reason):
    path = tmp_path / "m.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableFile) as caught:
        read_mask_file(path, width=8, height=8)
    assert caught.value.reason == reason

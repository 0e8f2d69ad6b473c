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


def _coco_masks(rng):
    """(H, W) uint8 masks of every kind COCO RLE meets: empty, full, single pixels, lines, noise
    of many densities (runs of 1 pixel, counts differences of both signs and of many 5-bit
    chunks), blobs touching each edge, runs that wrap from a column's bottom to the next top."""
    shapes = [(1, 1), (1, 9), (9, 1), (2, 3), (13, 17), (64, 48), (300, 700)]
    for h, w in shapes:
        yield np.zeros((h, w), np.uint8)
        yield np.ones((h, w), np.uint8)
        for density in (0.001, 0.05, 0.5, 0.95):
            yield (rng.random((h, w)) < density).astype(np.uint8)
        single = np.zeros((h, w), np.uint8)
        single[rng.integers(h), rng.integers(w)] = 1
        yield single
        edge = np.zeros((h, w), np.uint8)
        edge[h // 2:, : max(1, w // 3)] = 1  # to the bottom edge: the run wraps into the next column's top
        edge[: max(1, h // 4), w // 3:] = 1
        yield edge
        yy, xx = np.mgrid[:h, :w]
        yield (((yy - h / 2) / max(1, h / 3)) ** 2 + ((xx - w / 2) / max(1, w / 3)) ** 2 < 1).astype(np.uint8)
    yield np.tile(np.array([[0, 1], [1, 0]], np.uint8), (200, 300))  # 120,000 runs of 1
    long = np.zeros((2000, 3000), np.uint8)
    long[5:1995, 1:2999] = 1  # counts of millions: the longest chunk strings
    yield long


def test_encode_masks_equals_pycocotools_on_every_kind_of_mask():
    """The counts bytes, box and area are pycocotools' encode, toBbox and area, exactly."""
    rng = np.random.default_rng(0)
    for mask in _coco_masks(rng):
        stack = np.asfortranarray(np.stack([mask, 1 - mask], axis=2))  # (H, W, 2) and the inverse
        rows = encode_masks(stack)
        for n, row in enumerate(rows):
            reference = mask_utils.encode(np.asfortranarray(stack[:, :, n]))
            assert row["rle_counts"] == reference["counts"], (mask.shape, n)
            assert [row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]] == \
                mask_utils.toBbox(reference).tolist(), (mask.shape, n)
            assert row["area_frac"] == mask_utils.area(reference) / mask.size


def test_encode_masks_reads_any_nonzero_value_as_the_mask():
    """0/255 as 0/1 (pycocotools agrees); 1 next to 2 is one run here, two runs for pycocotools."""
    mask = np.zeros((6, 5), np.uint8)
    mask[1:4, 2] = 255
    assert encode_masks(np.asfortranarray(mask[:, :, None]))[0] == encode_mask(mask > 0)
    mask[2, 2] = 1
    mask[3, 3] = 2
    assert encode_masks(np.asfortranarray(mask[:, :, None]))[0] == encode_mask(mask > 0)


@pytest.mark.parametrize("content, reason", [(None, reasons.MISSING_FILE), (b"", reasons.EMPTY_FILE),
                                             (b"\x89PNG\r\n\x1a\nbroken", reasons.UNREADABLE_MASK)])
def test_unusable_mask_files_name_their_reason(tmp_path, content, reason):
    path = tmp_path / "m.png"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableFile) as caught:
        read_mask_file(path, width=8, height=8)
    assert caught.value.reason == reason

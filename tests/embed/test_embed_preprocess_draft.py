"""The embed stage's cheap host path: JPEGs decoded at 1/2, 1/4, 1/8 (Image.draft), masks decoded by window.

The reference is the whole-image path (``SubjectCutter(jpeg_draft=False)``, and
``segment_subject`` on pycocotools' whole mask), which is what the stage did before.
"""

import numpy as np
import open_clip
import pytest
import torch
from embed_inputs import BACKGROUND, rle_row
from PIL import Image
from pycocotools import mask as mask_utils

from flows import reasons
from flows.embed.preprocess import (
    SubjectCutter,
    decode_rle,
    draft_scale,
    pixel_box,
    rle_flips,
    rle_window,
    segment_subject,
    split_preprocess,
)

S = 224  # the input side of the ViT-B/L models; no model is needed, only open_clip's eval transform


@pytest.fixture(scope="module")
def host():
    return split_preprocess(open_clip.image_transform(S, is_train=False)).host


def _cutters(host):
    return (SubjectCutter(preprocess=host, image_size=S, background=BACKGROUND),
            SubjectCutter(preprocess=host, image_size=S, background=BACKGROUND, jpeg_draft=False))


def _ellipse(width, height, box):
    x0, y0, x1, y1 = box
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, rx, ry = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _photo(rng, width, height, box):
    """(image, mask): a photo-like frame: smooth colour field, fine texture, a textured elliptic subject."""
    field = Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.asarray(field).astype(np.int16) + (20 * np.sin(xx / 9.0 + yy / 13.0))[..., None]
    image += rng.integers(-4, 5, (height, width, 3), dtype=np.int16)
    mask = _ellipse(width, height, box)
    image[mask] = (rng.integers(40, 216, 3) + 30 * np.sin(xx[mask, None] / 7.0 - yy[mask, None] / 11.0)).astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _row(tmp_path, name, image, mask, *, mode="RGB", **save):
    """A work row: ``image`` saved as ``name`` (PIL picks the format from the suffix), ``mask`` as RLE."""
    path = tmp_path / name
    Image.fromarray(image).convert(mode).save(path, **save)
    r = rle_row("f", "s", mask)
    return {"image_file": str(path), "rle_counts": r["rle_counts"], "mask_width": r["width"],
            "mask_height": r["height"], "bbox_x": r["bbox_x"], "bbox_y": r["bbox_y"], "bbox_w": r["bbox_w"],
            "bbox_h": r["bbox_h"]}


# --- RLE windows ---------------------------------------------------------------------------------

def test_rle_window_equals_pycocotools_decode():
    rng = np.random.default_rng(0)
    for t in range(60):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        if t % 3 == 0:
            mask = rng.random((height, width)) < rng.random()  # many short runs
        else:
            x0, y0 = int(rng.integers(-5, width)), int(rng.integers(-5, height))
            mask = _ellipse(width, height, (x0, y0, x0 + int(rng.integers(2, 30)), y0 + int(rng.integers(2, 30))))
        if t % 10 == 9:
            mask[:] = t % 20 == 9  # all on / all off
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        flips = rle_flips(counts.decode() if t % 2 else counts, width=width, height=height)
        whole = decode_rle(counts, width=width, height=height)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = int(rng.integers(x0 + 1, width + 1)), int(rng.integers(y0 + 1, height + 1))
            window = rle_window(flips, height=height, box=(x0, y0, x1, y1), on=255)
            assert window.dtype == np.uint8 and window.T.flags.c_contiguous
            assert np.array_equal(window, whole[y0:y1, x0:x1].astype(np.uint8) * 255)


@pytest.mark.parametrize("counts", [b"", b"0", b"abc", b"\x7f\x80", b"PPPPPPPPPPPPPPPPP", "19", None])
def test_rle_flips_rejects_what_does_not_cover_the_mask(counts):
    # pycocotools decodes some of these (b"", b"0") into uninitialised memory; here they fail
    with pytest.raises((ValueError, TypeError)):
        rle_flips(counts, width=5, height=4)


def test_garbage_rle_is_an_unreadable_mask(tmp_path, host):
    image, mask = _photo(np.random.default_rng(1), 120, 90, (30, 20, 90, 70))
    row = {**_row(tmp_path, "a.png", image, mask), "rle_counts": b"0"}
    item = _cutters(host)[0](0, row)
    assert item.reason == reasons.UNREADABLE_MASK and "RLE" in item.detail


# --- choosing the reduction ---------------------------------------------------------------------------

@pytest.mark.parametrize("side,scale", [(100, 1), (447, 1), (448, 2), (895, 2), (896, 4), (1791, 4), (1792, 8),
                                        (5000, 8)])
def test_draft_scale_keeps_the_square_at_least_the_input_side(side, scale):
    assert draft_scale((10, 20, 10 + side, 20 + side // 3), min_side=S) == scale  # the long side counts
    assert draft_scale((10, 20, 10 + side // 3, 20 + side), min_side=S) == scale
    assert side // scale >= S or scale == 1


def test_drafted_square_is_never_smaller_than_the_input(tmp_path, host):
    rng = np.random.default_rng(2)
    width, height = 1000, 940
    cutter = _cutters(host)[0]
    seen = set()
    for k, side in enumerate((440, 447, 448, 449, 450, 897, 900)):
        x0, y0 = int(rng.integers(0, width - side)), int(rng.integers(0, height - side // 2))
        image, mask = _photo(rng, width, height, (x0, y0, x0 + side, y0 + side // 2))
        row = _row(tmp_path, f"{k}.jpg", image, mask, quality=90)
        decoded = cutter.decode(row)
        seen.add(decoded.scale)
        assert decoded.scale == draft_scale(pixel_box((row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]),
                                                      width=width, height=height), min_side=S)
        assert decoded.image.size == (-(-width // decoded.scale), -(-height // decoded.scale))
        square = cutter.cut_out(row)
        assert square.size[0] == square.size[1] >= S
    assert seen == {1, 2, 4}


# --- the drafted path against the whole decode ---------------------------------------------------------

# |drafted - whole| of the uint8 model input, mean over (3, S, S), measured on these frames (quality
# 90 JPEGs, 4 seeds each): 2.1-2.2 levels at k = 2, 2.6-2.8 at k = 4, 0.9-1.1 at k = 8. Mostly a
# sub-pixel shift: on the reduced grid the square's centre is placed to within half a reduced pixel
# (<= ~0.5 px of the input), and this texture is fine; the rest is DCT scaling vs bicubic
# antialiasing. The square placed one reduced pixel off gives 6.6 (k = 8) to 10.1 (k = 4).
MEAN_LEVELS = 3.5


@pytest.mark.parametrize("size,box,scale", [
    ((1200, 900), (300, 150, 900, 800), 2),
    ((1400, 1000), (200, 40, 1240, 980), 4),
    ((1900, 1100), (30, 200, 1860, 1000), 8),
])
def test_drafted_model_input_is_close_to_the_whole_decode(tmp_path, host, size, box, scale):
    width, height = size
    image, mask = _photo(np.random.default_rng(scale), width, height, box)
    row = _row(tmp_path, "a.jpg", image, mask, quality=90)
    drafted, whole = _cutters(host)
    assert drafted.decode(row).scale == scale and whole.decode(row).scale == 1
    a, b = drafted.subject_pixels(row), whole.subject_pixels(row)
    assert a.shape == b.shape == (3, S, S) and a.dtype == b.dtype == torch.uint8
    assert (a.int() - b.int()).abs().float().mean() < MEAN_LEVELS


def test_mask_and_image_stay_aligned_on_the_reduced_grid(tmp_path, host):
    """A red disc on green, its bbox on the 8 x 8 block grid: every reduced pixel is exactly predictable."""
    width, height, (x0, y0, side) = 1024, 1024, (96, 64, 896)
    yy, xx = np.mgrid[0:height, 0:width]
    disc = (xx - x0 - side / 2 + 0.5) ** 2 + (yy - y0 - side / 2 + 0.5) ** 2 <= (side / 2) ** 2
    image = np.where(disc[..., None], np.uint8([220, 30, 30]), np.uint8([30, 200, 30]))
    row = _row(tmp_path, "disc.jpg", image, disc, quality=95, subsampling=0)
    for scale, min_side in ((2, 448), (4, 224), (8, 112)):
        cutter = SubjectCutter(preprocess=host, image_size=min_side, background=BACKGROUND)
        assert cutter.decode(row).scale == scale
        out = np.asarray(cutter.cut_out(row)).astype(int)  # the square bbox fills the square
        assert out.shape == (side // scale, side // scale, 3)
        block = disc[y0:y0 + side, x0:x0 + side].reshape(side // scale, scale, side // scale, scale).mean((1, 3))
        outside, inside = block == 0, block == 1
        assert (out[outside] == BACKGROUND).all()  # not even a trace of the green around the disc
        assert np.abs(out[inside] - [220, 30, 30]).max() <= 40  # (JPEG ringing at the disc's edge)
        # edge blocks: the decoded block (red * a + green * (1 - a)) painted over the background with alpha a
        a = block[~outside & ~inside][:, None]
        decoded = a * [220, 30, 30] + (1 - a) * np.array([30, 200, 30])
        assert np.abs(out[~outside & ~inside] - (a * decoded + (1 - a) * np.array(BACKGROUND))).mean() < 8


def test_background_outside_an_unaligned_subject_is_exact(tmp_path, host):
    """Off the block grid: blocks without subject are the background colour exactly, and the image's green
    only shows as the sliver of an edge block (never as a whole pixel of it)."""
    width, height, box = 1237, 1011, (133, 57, 1101, 871)  # odd offsets, k = 4
    disc = _ellipse(width, height, box)
    image = np.where(disc[..., None], np.uint8([220, 30, 30]), np.uint8([30, 200, 30]))
    row = _row(tmp_path, "e.jpg", image, disc, quality=95, subsampling=0)
    drafted, whole = _cutters(host)
    assert drafted.decode(row).scale == 4
    out = np.asarray(drafted.cut_out(row)).astype(int)
    # a decoded edge block (red * a + green * (1 - a)) painted with alpha a has a green of at most 126
    # (at a = 1/4); a mask shifted off its image would paint pure green (200) somewhere
    assert out[..., 1].max() < 150
    # the exact background covers what the whole decode's does, less the ring of edge blocks
    exact = (out == BACKGROUND).all(-1).mean()
    assert 0 < (np.asarray(whole.cut_out(row)) == BACKGROUND).all(-1).mean() - exact < 4 / out.shape[0]
    a, b = drafted.subject_pixels(row).int(), whole.subject_pixels(row).int()
    assert (a - b).abs().float().mean() < MEAN_LEVELS


def test_small_subject_in_a_large_jpeg_is_decoded_whole(tmp_path, host):
    width, height = 1600, 1200
    image, mask = _photo(np.random.default_rng(5), width, height, (700, 500, 1100, 820))  # 400 px < 2 S
    row = _row(tmp_path, "small.jpg", image, mask, quality=90)
    drafted, whole = _cutters(host)
    assert drafted.decode(row).scale == 1
    assert torch.equal(drafted.subject_pixels(row), whole.subject_pixels(row))


def test_png_takes_the_whole_image_path_unchanged(tmp_path, host):
    width, height = 1000, 700
    image, mask = _photo(np.random.default_rng(6), width, height, (50, 40, 960, 690))  # k would be 2 for a JPEG
    row = _row(tmp_path, "a.png", image, mask)
    drafted = _cutters(host)[0]
    assert drafted.decode(row).scale == 1
    bbox = (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
    reference = segment_subject(Image.fromarray(image), mask, bbox, BACKGROUND)  # pycocotools' whole mask
    assert np.array_equal(np.asarray(drafted.cut_out(row)), np.asarray(reference))
    assert torch.equal(drafted.subject_pixels(row), host(reference))


def test_grey_jpeg_is_drafted_and_comes_out_rgb(tmp_path, host):
    image, mask = _photo(np.random.default_rng(7), 1000, 800, (140, 30, 840, 780))  # 750 px: k = 2
    row = _row(tmp_path, "grey.jpg", image, mask, mode="L", quality=90)
    drafted, whole = _cutters(host)
    assert drafted.decode(row).scale == 2 and drafted.decode(row).image.mode == "L"
    a, b = drafted.subject_pixels(row), whole.subject_pixels(row)
    assert a.shape == (3, S, S) and (a.int() - b.int()).abs().float().mean() < MEAN_LEVELS
    centre = a[:, S // 2 - 20:S // 2 + 20, S // 2 - 20:S // 2 + 20]  # inside the subject: grey
    assert torch.equal(centre[0], centre[1]) and torch.equal(centre[1], centre[2])


def test_truncated_jpeg_is_still_unreadable_when_drafted(tmp_path, host):
    image, mask = _photo(np.random.default_rng(8), 1000, 800, (40, 30, 960, 780))
    row = _row(tmp_path, "a.jpg", image, mask, quality=90)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 3])
    item = _cutters(host)[0](0, row)
    assert item.reason == reasons.UNREADABLE_IMAGE


def test_consecutive_boxes_of_one_photo_decode_it_once(tmp_path, host, monkeypatch):
    """Two subjects on one photo (OpenImages boxes), as consecutive rows: one decode, same pixels as fresh cutters."""
    width, height = 1200, 900
    rng = np.random.default_rng(5)
    image, big = _photo(rng, width, height, (100, 100, 800, 800))  # large enough for a 1/2 draft
    small = _ellipse(width, height, (900, 600, 1100, 850))  # too small to draft: its own decode
    first = _row(tmp_path, "photo.jpg", image, big, quality=90)
    second = {**first, **{k: v for k, v in _row(tmp_path, "unused.jpg", image, big, quality=90).items()
                          if k != "image_file"}}
    third = {**_row(tmp_path, "unused.jpg", image, small, quality=90), "image_file": first["image_file"]}
    expected = [SubjectCutter(preprocess=host, image_size=S, background=BACKGROUND).subject_pixels(r)
                for r in (first, second, third)]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    cutter = SubjectCutter(preprocess=host, image_size=S, background=BACKGROUND)
    got = [cutter.subject_pixels(r) for r in (first, second, third)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len(opened) == 2  # the second box reused the first decode; the third asked for another scale

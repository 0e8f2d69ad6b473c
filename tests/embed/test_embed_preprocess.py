import numpy as np
import open_clip
import pyarrow as pa
import pytest
import torch
from PIL import Image

from flows import reasons
from flows.embed.preprocess import (
    SubjectDataset, SubjectError, decode_rle, pixel_box, segment_subject, split_preprocess,
)
from embed_inputs import BACKGROUND, rle_row, subject_image


def _scene(width=120, height=90, box=(30, 20, 90, 50), seed=0):
    return subject_image(np.random.default_rng(seed), width, height, box)


def test_rle_fixture_round_trips():
    _, mask = _scene()
    row = rle_row("f", "s", mask)
    assert np.array_equal(decode_rle(row["rle_counts"], width=120, height=90), mask)
    assert (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]) == (30, 20, 60, 30)


def test_pixel_box_covers_fractional_bbox_and_clips():
    assert pixel_box((10.4, 5.6, 20.2, 10.1), width=100, height=100) == (10, 5, 31, 16)
    assert pixel_box((-3.0, 90.0, 20.0, 30.0), width=100, height=100) == (0, 90, 17, 100)


def test_background_replaced_outside_mask_and_crop_covers_bbox():
    image, mask = _scene()
    row = rle_row("f", "s", mask)
    bbox = (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
    out = np.asarray(segment_subject(Image.fromarray(image), mask, bbox, BACKGROUND))
    # 60 x 30 box -> 60 x 60 square, the crop centred vertically (15 rows of padding on top).
    assert out.shape == (60, 60, 3)
    crop_image, crop_mask = image[20:50, 30:90], mask[20:50, 30:90]
    placed = out[15:45]
    assert np.array_equal(placed[crop_mask], crop_image[crop_mask])  # every subject pixel kept
    assert (placed[~crop_mask] == BACKGROUND).all()  # outside the mask: background
    assert (out[:15] == BACKGROUND).all() and (out[45:] == BACKGROUND).all()  # square padding
    assert crop_mask.sum() == mask.sum()  # the crop holds the whole mask


def test_tall_subject_padded_left_and_right():
    image, mask = _scene(box=(50, 10, 70, 80))
    out = np.asarray(segment_subject(Image.fromarray(image), mask, (50, 10, 20, 70), BACKGROUND))
    assert out.shape == (70, 70, 3)
    assert (out[:, :25] == BACKGROUND).all() and (out[:, 45:] == BACKGROUND).all()


@pytest.mark.parametrize("mask_shape,bbox,reason", [
    ((80, 120), (30, 20, 60, 30), reasons.BAD_ANNOTATION),  # mask not at image size
    ((90, 120), (30, 20, 0, 30), reasons.UNREADABLE_MASK),  # empty bbox
    ((90, 120), (0, 0, 10, 10), reasons.UNREADABLE_MASK),  # no mask pixel inside the bbox
])
def test_unusable_masks_raise_with_reason(mask_shape, bbox, reason):
    image, _ = _scene()
    mask = np.zeros(mask_shape, dtype=bool)
    mask[30:40, 40:60] = True
    with pytest.raises(SubjectError) as err:
        segment_subject(Image.fromarray(image), mask, bbox, BACKGROUND)
    assert err.value.reason == reason


def _work(tmp_path, files_and_masks):
    rows = []
    for file, mask in files_and_masks:
        r = rle_row("f", "s", mask)
        rows.append({"image_file": str(file), "rle_counts": r["rle_counts"], "mask_width": r["width"],
                     "mask_height": r["height"], "bbox_x": r["bbox_x"], "bbox_y": r["bbox_y"],
                     "bbox_w": r["bbox_w"], "bbox_h": r["bbox_h"]})
    return pa.Table.from_pylist(rows)


def test_dataset_applies_the_models_own_preprocess(tmp_path, tiny_clip):
    image, mask = _scene()
    Image.fromarray(image).save(tmp_path / "a.png")  # lossless, so pixels can be compared
    dataset = SubjectDataset(_work(tmp_path, [(tmp_path / "a.png", mask)]), preprocess=tiny_clip.preprocess,
                             image_size=tiny_clip.image_size, background=BACKGROUND)
    item = dataset[0]
    assert item.reason == "" and item.pixels.shape == (3, tiny_clip.image_size, tiny_clip.image_size)
    cfg = open_clip.get_model_preprocess_cfg(tiny_clip.model)
    expected = (torch.tensor(BACKGROUND) / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert torch.allclose(item.pixels[:, 0, 0], expected.float(), atol=1e-5)  # padding corner: background
    reference = tiny_clip.preprocess(segment_subject(Image.open(tmp_path / "a.png"), mask,
                                                     (30, 20, 60, 30), BACKGROUND))
    assert torch.equal(item.pixels, reference)


def test_dataset_reports_missing_and_corrupt_images(tmp_path, tiny_clip):
    image, mask = _scene()
    Image.fromarray(image).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    work = _work(tmp_path, [(tmp_path / "absent.jpg", mask), (tmp_path / "cut.jpg", mask), (tmp_path / "full.jpg", mask)])
    dataset = SubjectDataset(work, preprocess=tiny_clip.preprocess, image_size=tiny_clip.image_size,
                             background=BACKGROUND)
    assert [dataset[i].reason for i in range(3)] == [reasons.MISSING_FILE, reasons.UNREADABLE_IMAGE, ""]
    assert not dataset[0].pixels.any()


def test_split_preprocess_is_bit_identical_to_the_models_transform(tiny_clip):
    image, mask = _scene(seed=3)
    subject = segment_subject(Image.fromarray(image), mask, (30, 20, 60, 30), BACKGROUND)
    split = split_preprocess(tiny_clip.preprocess)
    host = split.host(subject)
    assert host.dtype == torch.uint8 and host.shape == (3, 64, 64)
    assert torch.equal(split.device(host[None])[0], tiny_clip.preprocess(subject))


def test_split_preprocess_keeps_an_unknown_transform_whole():
    def custom(image):
        return torch.zeros(3, 8, 8)

    split = split_preprocess(custom)
    assert split.host is custom and split.device(torch.ones(1)) == torch.ones(1)

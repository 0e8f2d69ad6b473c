"""flows.probe: masks stored at another size than their image."""

import io

import numpy as np
import pytest
from PIL import Image

from flows import reasons
from flows.probe import UnreadableFile, decode_mask


def png(width: int, height: int) -> bytes:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(480, 360), (240, 180), (160, 120), (161, 120), (123, 93)])
def test_a_mask_at_the_image_aspect_is_resized_to_the_image(size):
    mask = decode_mask(png(*size), width=480, height=360)
    assert mask.shape == (360, 480) and mask.dtype == bool
    assert mask.mean() == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("image, size", [((305, 4000), (31, 400)), ((4000, 305), (400, 31)),
                                          ((4000, 3000), (80, 60)), ((1024, 683), (512, 342))])
def test_rounding_of_a_thin_masks_short_side_is_allowed(image, size):
    # 305 x 0.1 = 30.5 -> 31: 1.6% off on that side, within a pixel of rounding
    assert decode_mask(png(*size), width=image[0], height=image[1]).shape == (image[1], image[0])


@pytest.mark.parametrize("size", [(360, 480), (480, 300), (200, 120)])
def test_a_mask_of_another_aspect_is_unreadable_not_stretched(size):
    with pytest.raises(UnreadableFile, match=r"not the 480x360 image's aspect") as caught:
        decode_mask(png(*size), width=480, height=360)
    assert caught.value.reason == reasons.UNREADABLE_MASK


def _encoded(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _quarter(mode_values: np.ndarray) -> np.ndarray:
    values = np.zeros((36, 48), dtype=mode_values.dtype)
    values[:18, :24] = mode_values
    return values


def _cutout(mode: str) -> Image.Image:
    """The subject's colours over a transparent background (CarveKit's output): dark subject, bright rim."""
    colours = np.random.default_rng(0).integers(0, 100, (36, 48, 3), dtype=np.uint8)
    colours[18:] = 250  # outside the subject: colours a brightness reading would take for the mask
    image = Image.fromarray(np.dstack([colours, _quarter(np.uint8(255))]), mode="RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def _gray_palette_mask() -> Image.Image:
    image = Image.fromarray(_quarter(np.uint8(1)), mode="P")  # what PNG optimisers write for a 2-colour mask
    image.putpalette([0, 0, 0, 255, 255, 255])
    return image


def _opaque(mode: str) -> Image.Image:
    gray = Image.fromarray(_quarter(np.uint8(255)))
    return Image.merge(mode, [gray] * (len(mode) - 1) + [Image.new("L", gray.size, 255)])


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(_quarter(np.uint8(255))),                      # 8-bit gray
    lambda: Image.fromarray(_quarter(np.uint8(255))).convert("1"),         # 1-bit
    lambda: Image.fromarray(_quarter(np.uint8(255))).convert("RGB"),       # gray saved as RGB
    _gray_palette_mask,
    lambda: _opaque("LA"),
    lambda: _opaque("RGBA"),
    lambda: _cutout("RGBA"),
    lambda: _cutout("LA"),
    lambda: _cutout("P"),  # a palette with transparency (tRNS)
    lambda: Image.fromarray(_quarter(np.uint8(1))),  # 0/1 8-bit
    lambda: Image.fromarray(_quarter(np.uint8(1))).convert("RGB"),  # 0/1 gray RGB
    lambda: Image.fromarray(_quarter(np.uint16(1))).convert("I;16"),  # 0/1 16-bit
    lambda: Image.fromarray(_quarter(np.uint16(65535))).convert("I;16"),
    lambda: Image.fromarray(_quarter(np.uint16(255))).convert("I;16"),
], ids=["L", "1", "gray RGB", "gray palette", "opaque LA", "opaque RGBA", "RGBA cutout", "LA cutout", "P cutout",
        "0/1 L", "0/1 RGB", "0/1 16-bit", "0/65535 16-bit", "0/255 16-bit"])
def test_every_grayscale_encoding_of_a_mask_reads_the_same(make):
    mask = decode_mask(_encoded(make()), width=48, height=36)
    assert mask.sum() == 18 * 24 and mask[:18, :24].all()


def _voc_palette_mask() -> Image.Image:
    image = Image.fromarray(_quarter(np.uint8(1)), mode="P")  # class 1 in VOC's colour map: dark red
    image.putpalette([0, 0, 0, 128, 0, 0])
    return image


@pytest.mark.parametrize("make, says", [
    (_voc_palette_mask, "colour palette"),
    (lambda: Image.fromarray(np.arange(36 * 48, dtype=np.uint16).reshape(36, 48) * 30).convert("I;16"),
     "mode I;16 with 1728 levels"),
    (lambda: Image.merge("RGB", [Image.fromarray(_quarter(np.uint8(255)))] + [Image.new("L", (48, 36))] * 2),
     "colour RGB"),
], ids=["VOC palette", "soft 16-bit", "red on black"])
def test_a_mask_whose_brightness_is_not_the_mask_is_unreadable_with_what_it_is(make, says):
    # read as brightness, each of these would be an empty (or dilated) mask, rejected as too small
    with pytest.raises(UnreadableFile, match=says) as caught:
        decode_mask(_encoded(make()), width=48, height=36)
    assert caught.value.reason == reasons.UNREADABLE_MASK

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

"""Decoding and measuring one image or mask: the per-file work of the ingest stage.

Every image is decoded fully once here (a truncated JPEG only fails when its last rows are
decoded), and the statistics that the filters need are computed from that one decode, so
changing a filter threshold never decodes an image again.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from flows import reasons

Image.MAX_IMAGE_PIXELS = 200_000_000  # real photos are large; decompression bombs are larger


class UnreadableFile(ValueError):
    """A file that exists but cannot be used; ``reason`` is one of flows.reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageProbe:
    width: int
    height: int
    content_hash: str  # sha256 of the file bytes
    phash: int  # 64-bit DCT perceptual hash
    blur_score: float  # variance of the Laplacian at probe_side


@dataclass(frozen=True)
class MaskProbe:
    area_frac: float  # subject pixels / image pixels, at image resolution
    largest_cc_frac: float  # share of subject pixels in the largest 8-connected component
    box: tuple[float, float, float, float]  # (xmin, ymin, xmax, ymax) normalised; zeros if empty


def _decode(data: bytes, what: str, empty_reason: str, bad_reason: str) -> Image.Image:
    if not data:
        raise UnreadableFile(empty_reason, f"{what} is a zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableFile(bad_reason, f"{what} does not decode: {exc}") from None
    return image


def probe_image(data: bytes, *, probe_side: int) -> ImageProbe:
    """Decode image bytes and measure them; raise :class:`UnreadableFile` if that fails."""
    image = _decode(data, "image", reasons.EMPTY_FILE, reasons.UNREADABLE_IMAGE)
    width, height = image.size
    gray = image.convert("L")
    scale = probe_side / max(width, height)
    if scale < 1.0:
        gray = gray.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    pixels = np.asarray(gray, dtype=np.float32)
    blur = float(cv2.Laplacian(pixels, cv2.CV_32F).var())
    import imagehash  # here, not at the top: segment and embed read masks through this module without it

    phash = int(str(imagehash.phash(gray)), 16)
    return ImageProbe(width, height, hashlib.sha256(data).hexdigest(), phash, blur)


MASK_THRESHOLD = 127  # a mask PNG pixel is subject when its gray value is above this


def decode_mask(data: bytes, *, width: int, height: int) -> np.ndarray:
    """A data set's mask PNG bytes as a (height, width) bool array at image size.

    Masks stored smaller (OpenImages) are resized nearest with pixel centres aligned (OpenCV's
    INTER_NEAREST_EXACT, the same pixels as PIL's NEAREST), which keeps them binary. Plain
    INTER_NEAREST aligns corners and shifts an upscaled mask up to half a source pixel.
    A mask of another shape than the image (a transposed or cropped one) would be stretched
    onto the wrong pixels, so it raises.
    Raises :class:`UnreadableFile` (empty_file or unreadable_mask).
    """
    image = _decode(data, "mask", reasons.EMPTY_FILE, reasons.UNREADABLE_MASK)
    gray = _binary_levels(_mask_gray(image))
    if gray.shape != (height, width):
        _check_mask_shape(gray.shape, width=width, height=height)
        gray = cv2.resize(gray, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return gray > MASK_THRESHOLD


def _mask_gray(image: Image.Image) -> np.ndarray:
    """A mask image's (H, W) uint8 levels, where the level is what the mask means.

    - 1-bit or 8-bit grayscale (0 background, 255 subject): OpenImages' masks;
    - a cutout, the subject's colours over a transparent background: the alpha channel is the
      mask (CarveKit's output; AnyDoor reads MVImgNet's masks by their last channel). An alpha
      that is all opaque says nothing and is dropped;
    - an RGB or palette image whose colours are all grays reads as grayscale (PNG optimisers
      write two-colour masks as palettes);
    - a 16-bit or float mask of two levels (0/1, 0/255, 0/65535) reads as binary, and any of
      these stored as 0/1 (:func:`_binary_levels`).

    Other kinds would read as the wrong mask through their brightness, so they raise
    :class:`UnreadableFile` (unreadable_mask) saying what they are: a class-index palette
    (VOC style: dark colours, empty at 127), a colour mask, a 16-bit or float mask of more
    than two levels.
    """
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return np.asarray(alpha)
        image = image.convert(image.mode[:-1])
    mode = image.mode
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float: binary ones only
        values = np.asarray(image)
        levels = np.unique(values)
        if len(levels) <= 2 and levels[0] == 0:
            return np.where(values > 0, 255, 0).astype(np.uint8)
        raise UnreadableFile(reasons.UNREADABLE_MASK, f"mask image is mode {mode} with {len(levels)} levels; a "
                                                      f"16-bit or float mask must hold two (0 and one other)")
    if mode == "P":
        used = np.flatnonzero(np.bincount(np.asarray(image).ravel(), minlength=256))
        colours = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        if used.max() < len(colours) and (colours[used] == colours[used, :1]).all():
            return np.asarray(image.convert("L"))
        raise UnreadableFile(reasons.UNREADABLE_MASK, "mask is a colour palette PNG (class indices?), not a "
                                                      "1-bit or 8-bit grayscale mask (0 background, 255 subject)")
    if mode == "RGB":
        pixels = np.asarray(image)
        if (pixels == pixels[..., :1]).all():
            return np.ascontiguousarray(pixels[..., 0])
        raise UnreadableFile(reasons.UNREADABLE_MASK, "mask is a colour RGB image, not a 1-bit or 8-bit "
                                                      "grayscale mask (0 background, 255 subject)")
    raise UnreadableFile(reasons.UNREADABLE_MASK, f"mask image is mode {mode}; expected a 1-bit or 8-bit "
                                                  f"grayscale mask (0 background, 255 subject) or a cutout with "
                                                  f"the subject in the alpha channel")


def _binary_levels(gray: np.ndarray) -> np.ndarray:
    """A mask stored as 0/1 (common in segmentation data sets) as 0/255; others as they are."""
    return gray * np.uint8(255) if gray.max(initial=0) == 1 else gray


def _check_mask_shape(shape: tuple[int, int], *, width: int, height: int) -> None:
    """Raise unless a (h, w) mask is the image scaled by one factor, up to rounding: each side's
    scale may be off by one pixel of that side (a side rounded down or up), plus 1%."""
    mask_h, mask_w = shape
    scale_x, scale_y = mask_w / width, mask_h / height
    if abs(scale_x - scale_y) > 1 / width + 1 / height + 0.01 * max(scale_x, scale_y):
        raise UnreadableFile(reasons.UNREADABLE_MASK, f"mask is {mask_w}x{mask_h}, not the {width}x{height} "
                                                      f"image's aspect at any scale (transposed or cropped?)")


def probe_mask(data: bytes, *, width: int, height: int) -> MaskProbe:
    """Measure a subject mask, resized (nearest) to the image size if stored smaller."""
    return measure_mask(decode_mask(data, width=width, height=height))


def measure_mask(mask: np.ndarray) -> MaskProbe:
    """Area fraction, largest 8-connected component's share and box of a (H, W) mask (nonzero = subject)."""
    binary = (mask != 0).astype(np.uint8)
    height, width = binary.shape
    area = int(binary.sum())
    if area == 0:
        return MaskProbe(0.0, 0.0, (0.0, 0.0, 0.0, 0.0))
    count, _labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    largest = int(stats[1:count, cv2.CC_STAT_AREA].max())
    ys, xs = np.nonzero(binary.any(axis=1))[0], np.nonzero(binary.any(axis=0))[0]
    box = (xs[0] / width, ys[0] / height, (xs[-1] + 1) / width, (ys[-1] + 1) / height)
    return MaskProbe(area / (width * height), largest / area, tuple(float(v) for v in box))

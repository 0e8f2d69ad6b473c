"""Real photographs from scikit-image's data folder, and deterministic image I/O.

Only the photos that scikit-image ships load offline (others download on first use and fail
here), so the pools below are closed lists. Every writer uses fixed encoder settings and no
metadata, so the same pixels always give the same bytes.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# photos that ship with scikit-image (checked offline); "horse" is a binary silhouette, unused
SHIPPED_PHOTOS = (
    "astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel", "grass",
    "gravel", "horse", "hubble_deep_field", "moon", "page", "rocket", "text", "logo", "clock",
    "retina", "immunohistochemistry",
)
# backgrounds: photos whose frames stay sharp once scaled to a frame (measured: variance of the
# Laplacian > 100 at 256 px); moon, clock, colorwheel and retina crops are too smooth
BACKGROUNDS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "page", "rocket",
)
# MVImgNet backgrounds also need large-scale structure: behind an object seen from all sides,
# a uniform texture (brick, grass, gravel) would leave neighbouring frames near-duplicates;
# rocket is left out because frames cropped from its sky are nearly flat
SCENE_BACKGROUNDS = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "page",
)
JPEG_QUALITY = 92  # every sample JPEG; the near-duplicate fault re-encodes at another quality


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A shipped photo as RGB uint8 (H, W, 3); grey photos are replicated, alpha is flattened on white."""
    if name not in SHIPPED_PHOTOS:
        raise ValueError(f"{name!r} is not a photo scikit-image ships offline")
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
    if img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    img.setflags(write=False)
    return img


def resize(img: np.ndarray, width: int, height: int, *, nearest: bool = False) -> np.ndarray:
    """Resize an uint8 image (H, W[, C]) with PIL (Lanczos, or nearest for masks)."""
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize((width, height), resample))


def resize_premultiplied(rgba: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a premultiplied RGBA layer (h, w, 4) to (height, width, 4) without premultiplying again."""
    im = Image.frombytes("RGBa", (rgba.shape[1], rgba.shape[0]), np.ascontiguousarray(rgba).tobytes())
    small = im.resize((width, height), Image.Resampling.LANCZOS)
    return np.frombuffer(small.tobytes(), dtype=np.uint8).reshape(height, width, 4)


def panorama(name: str, height: int, min_width: int, n_views: int) -> np.ndarray:
    """The photo scaled to ``height`` and mirror-tiled into a seamless loop (H, W, 3).

    Frames of one object crop this loop at ``v / n_views`` of its width, so the background pans
    as the camera walks around the subject. The loop holds ``k`` (photo, mirrored photo) pairs
    with ``k`` coprime to ``n_views``: otherwise two views would crop the very same pixels.
    """
    photo = load_photo(name)
    w = max(1, round(photo.shape[1] * height / photo.shape[0]))
    tile = resize(photo, w, height)
    k = max(1, -(-min_width // (2 * w)))
    while math.gcd(k, n_views) != 1:
        k += 1
    return np.concatenate([tile, tile[:, ::-1]] * k, axis=1)


def crop_wrapped(strip: np.ndarray, x0: int, width: int) -> np.ndarray:
    """``width`` columns of ``strip`` starting at ``x0``, wrapping around its end."""
    cols = (np.arange(width) + x0) % strip.shape[1]
    return strip[:, cols]


def cover_crop(name: str, width: int, height: int, rng: np.random.Generator, zoom: float = 1.0) -> np.ndarray:
    """A ``width`` x ``height`` crop of the photo scaled to cover the frame (times ``zoom``)."""
    photo = load_photo(name)
    s = max(width / photo.shape[1], height / photo.shape[0]) * zoom
    w, h = max(width, round(photo.shape[1] * s)), max(height, round(photo.shape[0] * s))
    big = resize(photo, w, h)
    x0 = int(rng.integers(0, w - width + 1))
    y0 = int(rng.integers(0, h - height + 1))
    return big[y0:y0 + height, x0:x0 + width]


def over(background: np.ndarray, rgba: np.ndarray, x0: int = 0, y0: int = 0) -> np.ndarray:
    """Composite a premultiplied RGBA layer (h, w, 4) onto ``background`` (H, W, 3) at (x0, y0)."""
    out = background.astype(np.float32)  # copy
    h, w = rgba.shape[:2]
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    region = out[y0:y0 + h, x0:x0 + w]
    out[y0:y0 + h, x0:x0 + w] = rgba[..., :3].astype(np.float32) + region * (1.0 - alpha)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def light_gradient(rgb: np.ndarray, angle_rad: float, strength: float = 0.4) -> np.ndarray:
    """Brighten one side of the frame and darken the other along ``angle_rad`` (H, W, 3).

    The light on a real capture changes as the camera walks around; here it also keeps the
    perceptual hashes of an object's frames apart when the background is a uniform texture.
    """
    h, w = rgb.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xs - w / 2) * np.cos(angle_rad) + (ys - h / 2) * np.sin(angle_rad)) / (0.5 * np.hypot(w, h))
    gain = 1.0 + strength * ramp  # (H, W)
    return np.clip(rgb.astype(np.float32) * gain[..., None], 0, 255).round().astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Baseline JPEG bytes, fixed settings, no EXIF or other metadata."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def write_jpeg(rgb: np.ndarray, path: Path, quality: int = JPEG_QUALITY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(rgb, quality))


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """An 8-bit greyscale PNG, 255 = subject, 0 = background; no text chunks or timestamps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def write_cutout_png(rgb: np.ndarray, mask: np.ndarray, path: Path) -> None:
    """A mask as a cutout (CarveKit's output): the frame's colours on the subject, alpha 255 there; elsewhere
    black and transparent (the background's colours would quadruple the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    rgba = np.dstack([np.where(mask[..., None], rgb, 0), np.where(mask, 255, 0)]).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def write_rgba_png(rgba: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    path.write_bytes(buf.getvalue())


def read_rgba_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"))

"""Augmentation positives for single-view subjects (OpenImages): recipes and their replay.

A recipe (crop box, subject scale, flip, background id, seed) is all the training loader
needs to rebuild the positive exactly: :func:`apply_recipe` is deterministic in the recipe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flows.config.params import PairsParams


@dataclass(frozen=True)
class Recipe:
    crop: tuple[float, float, float, float]  # (x0, y0, x1, y1) normalised; always holds the subject box
    scale: float  # subject size factor applied after the crop
    flip: bool  # horizontal flip
    background: str | None  # image_path of another frame whose photo replaces the background, or None
    seed: int  # seeds everything random in apply_recipe


def recipe_seed(frame_id: str, index: int, seed: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{frame_id}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_recipe(frame_id: str, index: int, box: tuple[float, float, float, float],
                backgrounds: list[str], params: PairsParams) -> Recipe:
    """Recipe ``index`` for the subject in ``box`` (x0, y0, x1, y1 normalised)."""
    seed = recipe_seed(frame_id, index, params.seed)
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = box
    # A crop that keeps the whole subject box: each side extends by a random share of the margin.
    crop = (x0 * rng.uniform(0, 1), y0 * rng.uniform(0, 1),
            x1 + (1 - x1) * rng.uniform(0, 1), y1 + (1 - y1) * rng.uniform(0, 1))
    scale = float(rng.uniform(params.aug_scale_min, params.aug_scale_max))
    flip = bool(rng.uniform() < params.aug_flip_prob)
    background = None
    if backgrounds and rng.uniform() < params.aug_background_prob:
        background = backgrounds[int(rng.integers(len(backgrounds)))]
    return Recipe(tuple(float(v) for v in crop), scale, flip, background, seed)


def apply_recipe(image: Image.Image, mask: np.ndarray, recipe: Recipe, background: Image.Image | None = None, *,
                 fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[Image.Image, np.ndarray]:
    """Replay ``recipe`` on an RGB image and its (H, W) bool mask; returns the positive and its mask.

    The positive has the crop's size. ``scale`` resizes the crop's content inside that frame, so
    the subject's share of it changes by scale**2 (pairs' area_ratio): below 1 the content is
    whole, on ``fill``; above 1 its rim is cut off, a subject pixel (see _anchor) kept as central
    as the content allows. With a background photo, the scaled subject alone is pasted onto the
    unscaled photo. (Scaling the frame with its content would change nothing: the encoder sees
    every view at one size.)
    ``background`` must be the photo named by ``recipe.background`` (None if that is None).
    """
    width, height = image.size
    x0, y0, x1, y1 = recipe.crop
    left, top = int(np.floor(x0 * width)), int(np.floor(y0 * height))
    right, bottom = max(left + 1, int(np.ceil(x1 * width))), max(top + 1, int(np.ceil(y1 * height)))
    crop = image.crop((left, top, right, bottom))
    crop_mask = mask[top:bottom, left:right]
    size = (max(1, round(crop.width * recipe.scale)), max(1, round(crop.height * recipe.scale)))
    scaled = crop.resize(size, Image.BICUBIC)
    scaled_mask = np.asarray(Image.fromarray(crop_mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    offset = [_place(frame_side, side, c) for frame_side, side, c in zip(crop.size, size, _anchor(scaled_mask))]
    if background is None:
        frame = Image.new("RGB", crop.size, tuple(int(v) for v in fill))
        frame.paste(scaled, tuple(offset))
    else:  # the subject alone onto the unscaled photo: no seam where a scaled rectangle of it would end
        frame = background.convert("RGB").resize(crop.size, Image.BILINEAR)
        frame.paste(scaled, tuple(offset), Image.fromarray(scaled_mask.astype(np.uint8) * 255))
    out_mask = np.zeros((crop.height, crop.width), bool)
    _paste(out_mask, scaled_mask, *offset)
    if recipe.flip:
        frame = frame.transpose(Image.FLIP_LEFT_RIGHT)
        out_mask = out_mask[:, ::-1]
    return frame, np.ascontiguousarray(out_mask)


def _anchor(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the subject pixel nearest the mask's centroid, at its pixel's centre: a point of
    the subject itself (a box's centre can fall between the pieces of a mask), which _place keeps
    in the frame. The content's centre when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if not xs.size:
        return mask.shape[1] / 2, mask.shape[0] / 2
    nearest = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return xs[nearest] + 0.5, ys[nearest] + 0.5


def _place(frame: int, content: int, centre: float) -> int:
    """Offset of scaled content in a frame of one side: the anchor as near the frame's centre
    as the content allows (all of a smaller content inside the frame; a larger one covering it)."""
    low, high = sorted((0, frame - content))
    return int(min(high, max(low, round(frame / 2 - centre))))


def _paste(target: np.ndarray, source: np.ndarray, x: int, y: int) -> None:
    """``source`` into ``target`` with its top-left corner at (x, y), cut to ``target``."""
    h, w = source.shape
    top, left = max(0, y), max(0, x)
    bottom, right = min(target.shape[0], y + h), min(target.shape[1], x + w)
    target[top:bottom, left:right] = source[top - y:bottom - y, left - x:right - x]

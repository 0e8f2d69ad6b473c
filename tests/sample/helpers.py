"""Measurements the filters will make, re-implemented independently for the sample's tests."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def blur_score(im: Image.Image, side: int = 256) -> float:
    """Variance of the Laplacian of the greyscale image scaled to ``side`` on its longest side."""
    g = im.convert("L")
    s = side / max(g.size)
    g = g.resize((round(g.size[0] * s), round(g.size[1] * s)), Image.Resampling.BILINEAR)
    return float(ndimage.laplace(np.asarray(g, dtype=np.float64)).var())


def mask_levels(path: Path) -> np.ndarray:
    """A sample mask PNG's (H, W) uint8 levels: the alpha of a cutout (RGBA), else the gray (mode L)."""
    with Image.open(path) as m:
        assert m.mode in ("L", "RGBA"), m.mode
        return np.asarray(m.getchannel("A") if m.mode == "RGBA" else m)


def largest_component_share(mask: np.ndarray) -> float:
    labels, n = ndimage.label(mask)  # 4-connectivity: the stricter reading
    return float(np.bincount(labels.ravel())[1:].max() / mask.sum()) if n else 0.0


@lru_cache(maxsize=None)
def _faults(root: Path) -> tuple[dict, ...]:
    return tuple(json.loads((root / "faults.json").read_text()))


def fault_paths(root: Path) -> dict[tuple[str, str], list[str]]:
    """(source, path) -> fault names."""
    out: dict[tuple[str, str], list[str]] = {}
    for f in _faults(root):
        out.setdefault((f["source"], f["path"]), []).append(f["fault"])
    return out


def clean_mvimgnet_frames(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) of every MVImgNet frame that carries no planted fault."""
    bad = fault_paths(root)
    out = []
    for image in sorted((root / "mvimgnet").glob("*/*/images/*.jpg")):
        rel = image.relative_to(root / "mvimgnet")
        if ("mvimgnet", rel.as_posix()) in bad:
            continue
        cls, obj, _, name = rel.parts
        out.append((image, root / "mvimgnet_masks" / cls / obj / f"{name}.png"))
    return out

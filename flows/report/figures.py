"""Figures of the data report: image grids with mask overlays, and histograms."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

THUMB = 128  # pixels per grid cell
OVERLAY_RGB = np.array([255, 40, 40], dtype=np.float32)


def overlay(image: Image.Image, mask: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The image with its (H, W) bool mask tinted red, as a square thumbnail."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * OVERLAY_RGB
    thumb = Image.fromarray(rgb.astype(np.uint8))
    thumb.thumbnail((THUMB, THUMB))
    cell = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    cell.paste(thumb, ((THUMB - thumb.width) // 2, (THUMB - thumb.height) // 2))
    return cell


def grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], path: Path) -> Path:
    """Rows of thumbnails, each with a caption line above it, saved as PNG."""
    columns = max((len(cells) for _, cells in rows), default=1)
    line = 14
    canvas = Image.new("RGB", (columns * THUMB, len(rows) * (THUMB + line)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (caption, cells) in enumerate(rows):
        top = r * (THUMB + line)
        draw.text((2, top), caption[: columns * THUMB // 6], fill=(0, 0, 0))
        for c, cell in enumerate(cells):
            canvas.paste(cell, (c * THUMB, top + line))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=False)
    return path


def histograms(hists: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One bar chart per histogram (name -> (bin edges, counts)), side by side."""
    fig, axes = plt.subplots(1, len(hists), figsize=(4 * len(hists), 3), squeeze=False)
    for ax, (name, (edges, counts)) in zip(axes[0], hists.items()):
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#4c72b0")
        ax.set_title(name)
        ax.set_ylabel("count")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    plt.close(fig)
    return path

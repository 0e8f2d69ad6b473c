"""Where a frame's files live: the one mapping from (source, relative path) to disk."""

from __future__ import annotations

from pathlib import Path

from flows import ids
from flows.config.params import SourcesParams


def image_root(sources: SourcesParams, source: str) -> Path:
    """The folder a source's ``image_path`` values are relative to."""
    if source == ids.MVIMGNET:
        return Path(sources.mvimgnet_root)
    if source == ids.OPENIMAGES:
        return Path(sources.openimages_root)
    raise ValueError(f"unknown source {source!r}")


def image_file(sources: SourcesParams, source: str, image_path: str) -> Path:
    """The image of a frames row (``image_path`` is relative to its source's root)."""
    return image_root(sources, source) / image_path


def mask_file(sources: SourcesParams, source: str, mask_path: str) -> Path:
    """The data set's own mask of a frames row (MVImgNet: the mask tree; OpenImages: masks/)."""
    if source == ids.MVIMGNET:
        return Path(sources.mvimgnet_mask_root) / mask_path
    if source == ids.OPENIMAGES:
        return Path(sources.openimages_root) / mask_path
    raise ValueError(f"unknown source {source!r}")

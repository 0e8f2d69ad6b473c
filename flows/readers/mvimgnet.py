"""Reader for the MVImgNet tree as released.

- frames: ``ROOT/<class_id>/<object_id>/images/<frame>.jpg``
- poses:  ``ROOT/<class_id>/<object_id>/sparse/0/images.bin`` (COLMAP binary)
- masks:  ``MASKROOT/<class_id>/<object_id>/<frame>.jpg.png``
- class names: ``mvimgnet_category.txt``, lines ``id,name`` without a header
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.readers.colmap import ColmapFormatError, ImagePose, read_images_binary

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ObjectDir:
    """One captured object: its class and object ids and the frame files found on disk."""

    class_id: str
    object_id: str
    frames: tuple[str, ...]  # file names in images/, sorted


def read_categories(path: str | Path) -> dict[str, str]:
    """class id -> class name from ``mvimgnet_category.txt`` (``id,name`` lines, no header).

    Names may contain commas when quoted; blank lines are ignored.
    """
    with open(path, encoding="utf-8-sig", newline="") as handle:
        names = {}
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{number}: expected 'id,name', got {','.join(row)!r}")
            names[row[0].strip()] = ",".join(row[1:]).strip()
        return names


def _sorted_dirs(path: Path) -> list[str]:
    try:
        with os.scandir(path) as entries:
            return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except FileNotFoundError:
        return []


def iter_objects(root: str | Path) -> Iterator[ObjectDir]:
    """Walk ``root`` in sorted order, one :class:`ObjectDir` per ``<class>/<object>`` folder.

    Folders holding an ``images/`` folder or a COLMAP ``sparse/0/images.bin`` are objects (one
    whose images are gone still lists its frames in the model: they must be accounted for);
    the walk streams, so memory does not grow with the number of objects.
    """
    root = Path(root)
    for class_id in _sorted_dirs(root):
        for object_id in _sorted_dirs(root / class_id):
            folder = root / class_id / object_id
            images = folder / "images"
            if not images.is_dir():
                if (folder / "sparse" / "0" / "images.bin").is_file():
                    yield ObjectDir(class_id, object_id, ())
                continue
            with os.scandir(images) as entries:
                frames = sorted(
                    e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)
                )
            yield ObjectDir(class_id, object_id, tuple(frames))


def frame_relpath(class_id: str, object_id: str, frame: str) -> str:
    """Frame path relative to the MVImgNet root."""
    return f"{class_id}/{object_id}/images/{frame}"


def mask_relpath(class_id: str, object_id: str, frame: str) -> str:
    """Mask path relative to the mask root: ``<class>/<object>/<frame>.png`` (frame keeps its .jpg)."""
    return f"{class_id}/{object_id}/{frame}.png"


def read_object_poses(root: str | Path, class_id: str, object_id: str) -> dict[str, ImagePose]:
    """Frame file name -> COLMAP pose, from ``sparse/0/images.bin``; empty if there is none.

    A present but malformed model raises :class:`ColmapFormatError`.
    """
    path = Path(root) / class_id / object_id / "sparse" / "0" / "images.bin"
    if not path.is_file():
        return {}
    return {pose.name: pose for pose in read_images_binary(path).values()}


__all__ = [
    "ColmapFormatError", "ObjectDir", "frame_relpath", "iter_objects", "mask_relpath",
    "read_categories", "read_object_poses",
]

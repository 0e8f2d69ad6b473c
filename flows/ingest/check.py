"""The source paths of params.yaml, checked before any shard is planned.

A wrong path must not cost a full CSV spill, fail once per shard, or (a mask root one letter
off) quietly turn every MVImgNet frame into a ``missing_mask`` reject. So every path an enabled
source needs is checked first, and the class-name files are read once: all problems are
reported together, in one line naming the params keys.
"""

from __future__ import annotations

from pathlib import Path

from flows.config.params import SourcesParams
from flows.errors import UserFacingError
from flows.readers import mvimgnet as mvimgnet_reader
from flows.readers import openimages as openimages_reader


class SourceError(UserFacingError, FileNotFoundError):
    """A source path in params.yaml that is missing, of the wrong kind, or unreadable."""


def check_source_files(sources: SourcesParams) -> None:
    """Raise :class:`SourceError` naming every bad path of the enabled sources."""
    problems: list[str] = []

    def folder(key: str, path: Path, holds: str) -> None:
        if not path.is_dir():
            problems.append(f"sources.{key}: {path} is not a folder (it should hold {holds})")

    def table(key: str, path: Path, read) -> None:
        if not path.is_file():
            problems.append(f"sources.{key}: {path} does not exist")
            return
        try:
            read(path)
        except (ValueError, UnicodeDecodeError) as exc:
            problems.append(f"sources.{key}: {exc}")

    if "mvimgnet" in sources.enabled:
        folder("mvimgnet_root", Path(sources.mvimgnet_root), "<class_id>/<object_id>/images/<frame>.jpg")
        folder("mvimgnet_mask_root", Path(sources.mvimgnet_mask_root), "<class_id>/<object_id>/<frame>.jpg.png")
        table("mvimgnet_categories", Path(sources.mvimgnet_categories), mvimgnet_reader.read_categories)
    if "openimages" in sources.enabled:
        root = Path(sources.openimages_root)
        folder("openimages_root", root, f"{sources.openimages_split}/, masks/ and the CSVs")
        for key in ("openimages_boxes_csv", "openimages_segmentation_csv"):
            path = root / getattr(sources, key)
            if not path.is_file():
                problems.append(f"sources.{key}: {path} does not exist (the name is relative to "
                                f"sources.openimages_root)")
        table("openimages_classes_csv", root / sources.openimages_classes_csv,
              openimages_reader.read_class_descriptions)
    if problems:
        raise SourceError("; ".join(problems))


__all__ = ["SourceError", "check_source_files"]

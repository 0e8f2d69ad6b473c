"""Readers for OpenImages V7 annotation files in their released formats.

- boxes CSV (``oidv6-<split>-annotations-bbox.csv``):
  ImageID,Source,LabelName,Confidence,XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,IsGroupOf,IsDepiction,IsInside,...
- segmentation CSV (``<split>-annotations-object-segmentation.csv``):
  MaskPath,ImageID,LabelName,BoxID,BoxXMin,BoxXMax,BoxYMin,BoxYMax,PredictedIoU,Clicks
- class names (``oidv7-class-descriptions.csv``): LabelName,DisplayName

Columns are found by header name (extra columns are ignored). Files may carry a UTF-8 BOM
and CRLF line ends; quoted fields may hold commas. Rows that cannot be parsed are yielded
as :class:`BadRow` so the caller can record them, never silently skipped.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flows.errors import UserFacingError

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax")
BOX_FLAGS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction")
SEGMENTATION_COLUMNS = ("MaskPath", "ImageID", "LabelName", "BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax")
CLASS_COLUMNS = ("LabelName", "DisplayName")


class OpenImagesFormatError(UserFacingError, ValueError):
    """A file that is not the expected OpenImages CSV (e.g. missing required columns)."""


@dataclass(frozen=True)
class Box:
    """One row of the boxes CSV; coordinates normalised to [0, 1]."""

    image_id: str
    label: str
    xmin: float
    xmax: float
    ymin: float
    ymax: float
    is_occluded: bool | None
    is_truncated: bool | None
    is_group_of: bool | None
    is_depiction: bool | None


@dataclass(frozen=True)
class SegmentationRow:
    """One row of the segmentation CSV: a mask PNG for one box."""

    mask_path: str
    image_id: str
    label: str
    xmin: float
    xmax: float
    ymin: float
    ymax: float


@dataclass(frozen=True)
class BadRow:
    """A row that could not be parsed: where it is and why."""

    line: int
    detail: str
    image_id: str | None = None


def _open(path: Path):
    # utf-8-sig strips a BOM if present; newline="" lets csv handle CRLF and quoted newlines.
    # Bytes that are not UTF-8 become U+FFFD: the row is then a BadRow (see _iter_parsed), where a
    # strict decode would abort the whole file at the first of them.
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


def _header(reader: csv.DictReader, required: tuple[str, ...], path: Path) -> None:
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    missing = [c for c in required if c not in fields]
    if missing:
        raise OpenImagesFormatError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(fields)})")


def _flag(value: str | None) -> bool | None:
    if value is None or value.strip() in ("", "-1"):
        return None  # -1 means "unknown" in the released CSVs
    if value.strip() in ("0", "1"):
        return value.strip() == "1"
    raise ValueError(f"flag {value!r} is not 0, 1 or -1")


def _coords(row: dict, names: tuple[str, str, str, str]) -> tuple[float, float, float, float]:
    xmin, xmax, ymin, ymax = (float(row[n]) for n in names)
    if not (0.0 <= xmin < xmax <= 1.0 and 0.0 <= ymin < ymax <= 1.0):
        raise ValueError(f"box ({xmin}, {xmax}, {ymin}, {ymax}) is not inside [0, 1] with min < max")
    return xmin, xmax, ymin, ymax


def _iter_parsed(path: Path, required: tuple[str, ...], parse) -> Iterator:
    """Stream a CSV by header names; ``parse(row, image_id)`` makes a record or raises ValueError."""
    with _open(path) as handle:
        reader = csv.DictReader(handle)
        _header(reader, required, path)
        for row in reader:
            image_id = (row.get("ImageID") or "").strip() or None
            try:
                if None in row.values() or not image_id:
                    raise ValueError("too few fields or empty ImageID")
                if any("\ufffd" in value for value in row.values() if isinstance(value, str)):
                    raise ValueError("bytes that are not UTF-8")
                yield parse(row, image_id)
            except (ValueError, TypeError, AttributeError) as exc:
                yield BadRow(reader.line_num, str(exc), image_id)


def _parse_box(row: dict, image_id: str) -> Box:
    xmin, xmax, ymin, ymax = _coords(row, ("XMin", "XMax", "YMin", "YMax"))
    flags = [_flag(row.get(name)) for name in BOX_FLAGS]
    return Box(image_id, row["LabelName"].strip(), xmin, xmax, ymin, ymax, *flags)


def _parse_segmentation(row: dict, image_id: str) -> SegmentationRow:
    if not (row.get("MaskPath") or "").strip():
        raise ValueError("empty MaskPath")
    coords = _coords(row, ("BoxXMin", "BoxXMax", "BoxYMin", "BoxYMax"))
    return SegmentationRow(row["MaskPath"].strip(), image_id, row["LabelName"].strip(), *coords)


def iter_boxes(path: str | Path) -> Iterator[Box | BadRow]:
    """Stream the boxes CSV, one :class:`Box` or :class:`BadRow` per data row."""
    return _iter_parsed(Path(path), BOX_COLUMNS, _parse_box)


def iter_segmentations(path: str | Path) -> Iterator[SegmentationRow | BadRow]:
    """Stream the segmentation CSV, one :class:`SegmentationRow` or :class:`BadRow` per row."""
    return _iter_parsed(Path(path), SEGMENTATION_COLUMNS, _parse_segmentation)


def read_class_descriptions(path: str | Path) -> dict[str, str]:
    """LabelName (``/m/...``) -> DisplayName.

    With the ``LabelName,DisplayName`` header of ``oidv7-class-descriptions.csv``, or without a
    header, as ``oidv7-class-descriptions-boxable.csv`` and the V6 files have it (``/m/011k07,Tortoise``).
    """
    path = Path(path)
    with _open(path) as handle:
        rows = csv.reader(handle)
        first = next(rows, [])
        header = [f.strip() for f in first]
        if first and _is_label(first[0]):  # no header: LabelName, DisplayName
            label, name, rows = 0, 1, [first, *rows]
        elif set(CLASS_COLUMNS) <= set(header):  # columns found by name, in any order, among others
            label, name = header.index("LabelName"), header.index("DisplayName")
        else:
            raise OpenImagesFormatError(f"{path}: neither a header with LabelName and DisplayName nor a "
                                        f"'/m/...,name' row first (got {','.join(first)[:80]!r})")
        names = {}
        for row in rows:
            if len(row) > max(label, name) and row[label].strip():
                names[row[label].strip()] = row[name].strip()
        return names


def _is_label(value: str) -> bool:
    """A Freebase or Knowledge Graph id, the LabelName of every OpenImages class."""
    return value.strip().startswith(("/m/", "/g/"))


class PathOutsideRoot(ValueError):
    """An annotation path that would resolve outside its data root."""


def image_relpath(split: str, image_id: str) -> str:
    """Image path relative to the OpenImages root: ``<split>/<ImageID>.jpg``.

    An ImageID is a file stem (16 hex digits in the real data): one with a path separator, or
    ``.``/``..``, raises :class:`PathOutsideRoot`, as it could name a file outside the split folder.
    """
    if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", ".."):
        raise PathOutsideRoot(f"ImageID {image_id!r} is not a plain file name")
    return f"{split}/{image_id}.jpg"


def mask_relpath(image_id: str, mask_path: str) -> str:
    """Mask path relative to the OpenImages root: ``masks/<ImageID[0]>/<MaskPath>``.

    Rejects absolute paths and any ``..`` component: an annotation must never make the
    pipeline read outside the data root.
    """
    posix = PurePosixPath(mask_path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or not posix.parts:
        raise PathOutsideRoot(f"MaskPath {mask_path!r} leaves the masks folder")
    return f"masks/{image_id[0]}/{posix.as_posix()}"

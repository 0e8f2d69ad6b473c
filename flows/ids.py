"""Stable identifiers of frames and subjects, shared by every stage and the sample generator."""

from __future__ import annotations

import hashlib

MVIMGNET = "mvimgnet"
OPENIMAGES = "openimages"


def mvimgnet_subject_id(class_id: str, object_id: str) -> str:
    """One MVImgNet object: ``mvimgnet:<class_id>/<object_id>``."""
    return f"{MVIMGNET}:{class_id}/{object_id}"


def mvimgnet_frame_id(class_id: str, object_id: str, frame_name: str) -> str:
    """One MVImgNet frame: ``mvimgnet:<class_id>/<object_id>/<frame file name>``."""
    return f"{mvimgnet_subject_id(class_id, object_id)}/{frame_name}"


def openimages_box_key(image_id: str, label: str, xmin: float, xmax: float, ymin: float, ymax: float) -> str:
    """A short stable hash of one OpenImages box (the boxes CSV has no box id of its own).

    Coordinates are rounded to 6 decimals, the precision of the released CSVs, so that
    the same box read from the boxes CSV and from the segmentation CSV gets the same key.
    """
    text = f"{image_id}|{label}|{xmin:.6f}|{xmax:.6f}|{ymin:.6f}|{ymax:.6f}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def openimages_frame_id(image_id: str, box_key: str) -> str:
    """One OpenImages box: ``openimages:<ImageID>/<box key>``; each box is its own subject."""
    return f"{OPENIMAGES}:{image_id}/{box_key}"

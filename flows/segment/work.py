"""Per-frame work of the ``segment`` stage: which frames need SAM, loading them, building rows.

A frame with a mask in its data set gets that mask (method ``provided``), read without
decoding the image (ingest decoded every image fully already). Frames without one, and in
``refine`` mode also the frames with one, go to SAM, grouped by image so that the image is
decoded and encoded once for all its boxes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flows import paths, reasons
from flows.accounting import FRAME, reject_row
from flows.config.params import SourcesParams
from flows.probe import UnreadableFile
from flows.segment.masks import encode_mask, mask_box, read_mask_file
from flows.segment.sam_infer import ImagePrompts

STAGE = "segment"
PROVIDED, SAM_BOX, SAM_REFINED = "provided", "sam_box", "sam_refined"  # MASKS.method values


def image_file(sources: SourcesParams, frame: dict) -> Path:
    return paths.image_file(sources, frame["source"], frame["image_path"])


def mask_file(sources: SourcesParams, frame: dict) -> Path:
    return paths.mask_file(sources, frame["source"], frame["mask_path"])


def frame_reject(frame: dict, reason: str, detail: str, *, path: str | None = None) -> dict[str, Any]:
    return reject_row(item_id=frame["frame_id"], source=frame["source"], kind=FRAME,
                      path=path or frame["image_path"], stage=STAGE, reason=reason, detail=detail)


def mask_row(frame: dict, rle: dict, *, width: int, height: int, quality: float, method: str,
             model_id: str | None) -> dict[str, Any]:
    """One masks row (flows.schemas.MASKS) from :func:`flows.segment.masks.encode_mask` output."""
    return {"frame_id": frame["frame_id"], "subject_id": frame["subject_id"], "width": width,
            "height": height, **rle, "quality": quality, "method": method, "model_id": model_id}


def provided_result(frame: dict, sources: SourcesParams) -> dict[str, Any]:
    """The frame's own mask as a masks row, or a rejects row (kind ``reject``) if it is unusable."""
    try:
        mask = read_mask_file(mask_file(sources, frame), width=frame["width"], height=frame["height"])
    except UnreadableFile as exc:
        return {"reject": frame_reject(frame, exc.reason, exc.detail, path=frame["mask_path"])}
    if not mask.any():
        return {"reject": frame_reject(frame, reasons.EMPTY_MASK, "the provided mask has no subject pixel",
                                       path=frame["mask_path"])}
    return {"mask": mask_row(frame, encode_mask(mask), width=frame["width"], height=frame["height"],
                             quality=1.0, method=PROVIDED, model_id=None)}


@dataclass
class ImageGroup:
    """The frames of one image that go to SAM, in input order."""

    path: Path
    frames: list[tuple[int, dict]]  # (row position in the shard, frames row)


@dataclass
class LoadedGroup:
    """An image group after decoding: SAM prompts for the frames that can be segmented."""

    group: ImageGroup
    prompts: ImagePrompts | None  # None when no frame of the group is left for SAM
    positions: list[int] = field(default_factory=list)  # row position of each prompt's frame
    provided: list[np.ndarray | None] = field(default_factory=list)  # refine: each prompt's provided mask
    rejects: dict[int, dict] = field(default_factory=dict)  # row position -> rejects row


def group_by_image(rows: list[dict], *, refine: bool, sources: SourcesParams) -> tuple[list[int], list[ImageGroup]]:
    """(positions of frames served by their provided mask alone, SAM groups in first-seen order)."""
    provided_only: list[int] = []
    groups: dict[Path, ImageGroup] = {}
    for position, frame in enumerate(rows):
        if frame["mask_path"] is not None and not refine:
            provided_only.append(position)
            continue
        path = image_file(sources, frame)
        groups.setdefault(path, ImageGroup(path, [])).frames.append((position, frame))
    return provided_only, list(groups.values())


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8; raises :class:`UnreadableFile` (missing, empty or undecodable)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnreadableFile(reasons.MISSING_FILE, "image file does not exist") from None  # the path column says which
    if not data:
        raise UnreadableFile(reasons.EMPTY_FILE, "image is a zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableFile(reasons.UNREADABLE_IMAGE, f"image does not decode: {exc}") from None


def load_group(group: ImageGroup, sources: SourcesParams, resize) -> LoadedGroup:
    """Decode the image and the frames' prompts; runs in a loader thread.

    The box prompt is the frame's box, or in refine mode the box of the provided mask.
    """
    loaded = LoadedGroup(group, None)
    try:
        rgb = read_rgb(group.path)
    except UnreadableFile as exc:
        loaded.rejects = {pos: frame_reject(frame, exc.reason, exc.detail) for pos, frame in group.frames}
        return loaded
    height, width = rgb.shape[:2]
    boxes = []
    for position, frame in group.frames:
        provided = None
        if frame["mask_path"] is not None:
            try:
                provided = read_mask_file(mask_file(sources, frame), width=width, height=height)
            except UnreadableFile as exc:
                loaded.rejects[position] = frame_reject(frame, exc.reason, exc.detail, path=frame["mask_path"])
                continue
            box = mask_box(provided)
            if box is None:
                loaded.rejects[position] = frame_reject(frame, reasons.EMPTY_MASK, "the provided mask has no "
                                                        "subject pixel", path=frame["mask_path"])
                continue
        else:
            box = (frame["box_xmin"] * width, frame["box_ymin"] * height,
                   frame["box_xmax"] * width, frame["box_ymax"] * height)
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                loaded.rejects[position] = frame_reject(frame, reasons.BAD_ANNOTATION,
                                                        f"subject box {box} is under one pixel wide or high")
                continue
        boxes.append(box)
        loaded.positions.append(position)
        loaded.provided.append(provided)
    if boxes:
        loaded.prompts = ImagePrompts(resized=resize(rgb), original_size=(height, width),
                                      boxes=np.asarray(boxes, dtype=np.float64), mask_prompts=loaded.provided)
    return loaded

"""Ingest of MVImgNet: plan shards of objects, then probe every frame of a shard."""

from __future__ import annotations

import json
from pathlib import Path

from flows import ids, reasons
from flows.config.params import SourcesParams
from flows.accounting import ANNOTATION, FRAME, reject_row
from flows.ingest.records import ShardOutput, ShardWriter, frame_row
from flows.probe import UnreadableFile, probe_image, probe_mask
from flows.readers import mvimgnet as reader

SOURCE = ids.MVIMGNET
STAGE = "ingest"


def plan_shards(sources: SourcesParams, *, frames_per_shard: int, work_dir: Path) -> list[Path]:
    """Group objects (whole objects, in sorted order) into shards of about ``frames_per_shard``.

    Each shard is a small JSON file listing its objects; the walk streams, so the plan
    never holds more than one shard in memory.
    """
    root = Path(sources.mvimgnet_root)
    if not root.is_dir():
        raise FileNotFoundError(f"sources.mvimgnet_root: {root} is not a folder")
    specs: list[Path] = []
    batch: list[list[str]] = []
    frames = 0

    def flush() -> None:
        nonlocal batch, frames
        if batch:
            spec = work_dir / f"mvimgnet-{len(specs):05d}.json"
            spec.write_text(json.dumps(batch))
            specs.append(spec)
            batch, frames = [], 0

    for obj in reader.iter_objects(root):
        batch.append([obj.class_id, obj.object_id])
        frames += max(1, len(obj.frames))
        if frames >= frames_per_shard:
            flush()
    flush()
    return specs


def ingest_shard(spec: Path, sources: SourcesParams, *, probe_side: int, out: ShardOutput) -> ShardOutput:
    """Probe every frame of the objects listed in ``spec``; write its frames and rejects parts."""
    root = Path(sources.mvimgnet_root)
    mask_root = Path(sources.mvimgnet_mask_root)
    categories = reader.read_categories(sources.mvimgnet_categories)
    writer = ShardWriter(out)
    for class_id, object_id in json.loads(spec.read_text()):
        _ingest_object(root, mask_root, categories, class_id, object_id, probe_side, writer)
    return writer.close()


def _ingest_object(root: Path, mask_root: Path, categories: dict[str, str], class_id: str,
                   object_id: str, probe_side: int, writer: ShardWriter) -> None:
    images_dir = root / class_id / object_id / "images"
    files = sorted(p.name for p in images_dir.iterdir() if p.is_file()) if images_dir.is_dir() else []
    on_disk = [name for name in files if name.lower().endswith(reader.IMAGE_SUFFIXES)]
    others = sorted(set(files) - set(on_disk))
    for name in others:  # accounted for (.DS_Store too), never read
        writer.rejects.append(reject_row(
            item_id=ids.mvimgnet_frame_id(class_id, object_id, name), source=SOURCE, kind=FRAME,
            path=reader.frame_relpath(class_id, object_id, name), stage=STAGE, reason=reasons.NOT_AN_IMAGE,
            detail=f"a file in images/ whose suffix is not one of {', '.join(reader.IMAGE_SUFFIXES)}"))
    model = f"{class_id}/{object_id}/sparse/0/images.bin"

    def model_reject(reason: str, detail: str) -> None:  # the object's frames stay, without poses
        writer.rejects.append(reject_row(item_id=f"{SOURCE}:{model}", source=SOURCE, kind=ANNOTATION, path=model,
                                         stage=STAGE, reason=reason, detail=detail))

    try:
        poses = reader.read_object_poses(root, class_id, object_id)
    except reader.ColmapFormatError as exc:
        poses = {}
        model_reject(reasons.BAD_ANNOTATION, f"COLMAP model unreadable, frames kept without pose: {exc}")
    else:
        if not poses and not (Path(root) / model).is_file():
            model_reject(reasons.MISSING_FILE, "no COLMAP model, frames kept without pose (pairs falls back to "
                                               "a frame gap)")
    class_name = categories.get(class_id)
    for index, frame in enumerate(sorted((set(on_disk) | set(poses)) - set(others))):  # others: rejected above
        frame_id = ids.mvimgnet_frame_id(class_id, object_id, frame)
        rel = reader.frame_relpath(class_id, object_id, frame)

        def reject(reason: str, detail: str) -> None:
            writer.rejects.append(reject_row(item_id=frame_id, source=SOURCE, kind=FRAME, path=rel,
                                             stage=STAGE, reason=reason, detail=detail))

        if class_name is None:
            reject(reasons.UNKNOWN_CLASS, f"class id {class_id!r} is not in the category file "
                                          "(sources.mvimgnet_categories)")
            continue
        if frame not in on_disk:
            reject(reasons.MISSING_FILE, "listed in sparse/0/images.bin but absent from images/")
            continue
        try:
            image = probe_image((root / rel).read_bytes(), probe_side=probe_side)
        except UnreadableFile as exc:
            reject(exc.reason, exc.detail)
            continue
        mask_rel = reader.mask_relpath(class_id, object_id, frame)
        mask = None
        if (mask_root / mask_rel).is_file():
            try:
                mask = probe_mask((mask_root / mask_rel).read_bytes(), width=image.width, height=image.height)
            except UnreadableFile as exc:
                writer.rejects.append(reject_row(
                    item_id=f"{frame_id}#mask", source=SOURCE, kind=ANNOTATION, path=mask_rel,
                    stage=STAGE, reason=exc.reason, detail=f"{exc.detail}; frame kept without mask"))
        pose = poses.get(frame)
        writer.frames.append(frame_row(
            frame_id=frame_id, source=SOURCE, subject_id=ids.mvimgnet_subject_id(class_id, object_id),
            class_id=class_id, class_name=class_name, image_path=rel, image=image,
            box=mask.box if mask is not None else (0.0, 0.0, 1.0, 1.0),
            mask_path=mask_rel if mask is not None else None, mask=mask, frame_index=index,
            qvec=None if pose is None else pose.qvec, tvec=None if pose is None else pose.tvec))

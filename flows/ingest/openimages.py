"""Ingest of OpenImages V7: partition the CSVs by image, then join and probe per partition.

The boxes and segmentation CSVs are streamed once and their rows spilled into partition
files, each a contiguous range of ImageIDs (an out-of-core join), so memory stays flat however
large the CSVs are; each partition is one shard task. The partitions in turn list the images
in ImageID order, whatever their number.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from contextlib import ExitStack
from pathlib import Path

from flows import ids, reasons
from flows.config.params import SourcesParams
from flows.accounting import ANNOTATION, FRAME, reject_row
from flows.ingest.records import ShardOutput, ShardWriter, frame_row
from flows.probe import UnreadableFile, probe_image, probe_mask
from flows.readers import openimages as reader
from flows.tables import write_table
from flows.schemas import REJECTS

SOURCE = ids.OPENIMAGES
STAGE = "ingest"


def _csv_path(sources: SourcesParams, name: str) -> Path:
    return Path(sources.openimages_root) / name


def _count_data_rows(path: Path) -> int:
    with open(path, "rb") as handle:
        return max(0, sum(1 for _ in handle) - 1)


_HEX = "0123456789abcdef"
_DIGITS = 8  # hex digits that place an ImageID: 32 bits


def _position(image_id: str) -> int:
    """The largest 8-hex-digit string that sorts at or before ``image_id``, as a number (0 if none).

    Non-decreasing in string order, so a partition is a range of ImageIDs; for V7's ImageIDs
    (16 hex digits, hashes) it is their first 32 bits, spread evenly.
    """
    for i, char in enumerate(image_id[:_DIGITS]):
        if char in _HEX:
            continue
        head = int(image_id[:i] or "0", 16) << 4 * (_DIGITS - i)  # the prefix, then zeros
        if char > "f":  # after every hex digit: the prefix then all f
            return head + (1 << 4 * (_DIGITS - i)) - 1
        if "9" < char < "a":  # between 9 and a: the prefix, 9, then all f
            return head + (10 << 4 * (_DIGITS - i - 1)) - 1
        return max(0, head - 1) if i else 0  # before 0: the string just below the prefix
    if len(image_id) < _DIGITS:  # a hex prefix shorter than 8 sorts before its zero-padded form
        return max(0, (int(image_id or "0", 16) << 4 * (_DIGITS - len(image_id))) - 1)
    return int(image_id[:_DIGITS], 16)


def _partition(image_id: str, n: int) -> int:
    """Partitions are ranges of ImageID order: taken in turn they list the images in one order
    whatever their number, so ingest.frames_per_shard changes no output byte, and the filter's
    "earlier copy" of a duplicate is always the same one."""
    return _position(image_id) * n >> 4 * _DIGITS


SPILL_FILES = 256  # files open at once while the CSVs are streamed (the usual limit is 1,024)


def plan_shards(sources: SourcesParams, *, frames_per_shard: int, work_dir: Path) -> tuple[list[Path], Path]:
    """Spill box and mask rows into partitions; return the partition files and a rejects part.

    A partition holds the rows of the images in one range of ImageIDs: about
    ``frames_per_shard`` boxes, so 57,000 partitions for V7 train's 14.6M boxes at 256. The CSVs
    are streamed once into at most SPILL_FILES buckets (partition p goes to bucket p % SPILL_FILES),
    then each bucket, in memory (about 1/SPILL_FILES of the spilled rows), is cut into its
    partitions' files, one file open at a time. The rejects part holds the CSV rows that could
    not be parsed.
    """
    boxes_csv = _csv_path(sources, sources.openimages_boxes_csv)
    seg_csv = _csv_path(sources, sources.openimages_segmentation_csv)
    n = max(1, -(-_count_data_rows(boxes_csv) // frames_per_shard))
    buckets = [work_dir / f"openimages-spill-{b:03d}.jsonl" for b in range(min(n, SPILL_FILES))]
    bad_rows = []
    with ExitStack() as stack:
        handles = [stack.enter_context(open(path, "w", encoding="utf-8")) for path in buckets]
        for kind, csv_path, rows in (("box", boxes_csv, reader.iter_boxes(boxes_csv)),
                                     ("seg", seg_csv, reader.iter_segmentations(seg_csv))):
            for row in rows:
                if isinstance(row, reader.BadRow):
                    bad_rows.append(reject_row(
                        item_id=f"{SOURCE}:{csv_path.name}:{row.line}", source=SOURCE,
                        kind=FRAME if kind == "box" else ANNOTATION, path=f"{csv_path.name}:{row.line}",
                        stage=STAGE, reason=reasons.BAD_ANNOTATION, detail=row.detail))
                    continue
                partition = _partition(row.image_id, n)
                handles[partition % len(buckets)].write(f"{partition}\t{json.dumps({'t': kind, **row.__dict__})}\n")
    parts = [work_dir / f"openimages-{i:05d}.jsonl" for i in range(n)]
    for b, bucket in enumerate(buckets):
        _cut_bucket(bucket, {p: parts[p] for p in range(b, n, len(buckets))})
    rejects = work_dir / "openimages-csv-rejects.parquet"
    write_table(rejects, REJECTS, bad_rows)
    return parts, rejects


def _cut_bucket(bucket: Path, parts: dict[int, Path]) -> None:
    """Write a bucket's "<partition>\t<record>" lines to the files of ``parts`` (the bucket's
    partitions, every one written, even if empty) in spill order, which is CSV order; delete it."""
    lines: dict[int, list[str]] = defaultdict(list)
    with open(bucket, encoding="utf-8") as handle:
        for line in handle:
            partition, record = line.split("\t", 1)
            lines[int(partition)].append(record)
    if not lines.keys() <= parts.keys():
        raise AssertionError(f"{bucket}: rows of partitions {sorted(lines.keys() - parts.keys())[:5]} "
                             "that are not the bucket's")
    for partition, path in parts.items():
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(lines.pop(partition, []))
    bucket.unlink()


def ingest_shard(part: Path, sources: SourcesParams, *, probe_side: int, out: ShardOutput) -> ShardOutput:
    """Join one partition's boxes with their masks, probe images and masks, write the parts."""
    root = Path(sources.openimages_root)
    classes = reader.read_class_descriptions(_csv_path(sources, sources.openimages_classes_csv))
    boxes: dict[str, list[tuple[str, reader.Box]]] = defaultdict(list)
    masks: dict[str, list[reader.SegmentationRow]] = defaultdict(list)
    with open(part, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            kind = record.pop("t")
            if kind == "box":
                box = reader.Box(**record)
                key = ids.openimages_box_key(box.image_id, box.label, box.xmin, box.xmax, box.ymin, box.ymax)
                boxes[box.image_id].append((key, box))
            else:
                seg = reader.SegmentationRow(**record)
                key = ids.openimages_box_key(seg.image_id, seg.label, seg.xmin, seg.xmax, seg.ymin, seg.ymax)
                masks[key].append(seg)
    writer = ShardWriter(out)
    mask_keys: dict[str, list[str]] = defaultdict(list)  # image -> its masks' box keys
    for key in sorted(masks):
        mask_keys[masks[key][0].image_id].append(key)
    for image_id in sorted(boxes.keys() | mask_keys.keys()):
        if image_id in boxes:
            _ingest_image(root, sources.openimages_split, classes, image_id, boxes[image_id], masks,
                          probe_side, writer)
        for key in mask_keys.get(image_id, []):  # whatever no box of the image claimed
            for seg in masks.pop(key, []):
                writer.rejects.append(_mask_reject(seg, reasons.ORPHAN_MASK, "no box in the boxes CSV has this box"))
        writer.end_group()  # the image's rows together, in ImageID order
    return writer.close()


def _mask_reject(seg: reader.SegmentationRow, reason: str, detail: str) -> dict:
    return reject_row(item_id=f"{SOURCE}:{seg.image_id}:{seg.mask_path}", source=SOURCE, kind=ANNOTATION,
                      path=seg.mask_path, stage=STAGE, reason=reason, detail=detail)


def _ingest_image(root: Path, split: str, classes: dict[str, str], image_id: str,
                  image_boxes: list[tuple[str, reader.Box]], masks: dict, probe_side: int,
                  writer: ShardWriter) -> None:
    seen: Counter[str] = Counter()
    rel, image, failure = _probe_listed_image(root, split, image_id, probe_side)
    for key, box in sorted(image_boxes, key=lambda kb: kb[0]):
        frame_id = ids.openimages_frame_id(image_id, key)
        claimed = sorted(masks.pop(key, []), key=lambda s: s.mask_path)
        for extra in claimed[1:]:
            writer.rejects.append(_mask_reject(extra, reasons.ORPHAN_MASK, "a second mask for one box"))

        def reject(reason: str, detail: str, item_id: str = frame_id) -> None:
            writer.rejects.append(reject_row(item_id=item_id, source=SOURCE, kind=FRAME, path=rel,
                                             stage=STAGE, reason=reason, detail=detail))
            for seg in claimed[:1]:  # the box's mask goes with it, accounted for
                writer.rejects.append(_mask_reject(seg, reason, f"its box was rejected: {detail}"))

        seen[key] += 1
        if seen[key] > 1:  # an id of its own: frame_id is the first row's, which may be kept
            reject(reasons.BAD_ANNOTATION, "the same box appears twice in the boxes CSV",
                   item_id=f"{frame_id}#repeat{seen[key] - 1}")
            continue
        if failure is not None:
            reject(*failure)
            continue
        if box.label not in classes:
            reject(reasons.UNKNOWN_CLASS, f"label {box.label!r} is not in the class descriptions")
            continue
        mask_rel, mask = _probe_box_mask(root, image, claimed[:1], writer)
        writer.frames.append(frame_row(
            frame_id=frame_id, source=SOURCE, subject_id=frame_id, class_id=box.label,
            class_name=classes[box.label], image_path=rel, image=image,
            box=(box.xmin, box.ymin, box.xmax, box.ymax), mask_path=mask_rel, mask=mask,
            flags={"is_group_of": box.is_group_of, "is_depiction": box.is_depiction,
                   "is_occluded": box.is_occluded, "is_truncated": box.is_truncated}))


def _probe_listed_image(root: Path, split: str, image_id: str, probe_side: int):
    """(path relative to the root, probe or None, (reason, detail) or None) of a boxes-CSV image."""
    try:
        rel = reader.image_relpath(split, image_id)
    except reader.PathOutsideRoot as exc:  # never opened
        return f"{split}/{image_id}.jpg", None, (reasons.PATH_OUTSIDE_ROOT, str(exc))
    if not (root / rel).is_file():
        return rel, None, (reasons.MISSING_FILE,
                           f"listed in the boxes CSV but {rel} is not under sources.openimages_root")
    try:
        return rel, probe_image((root / rel).read_bytes(), probe_side=probe_side), None
    except UnreadableFile as exc:
        return rel, None, (exc.reason, exc.detail)


def _probe_box_mask(root: Path, image, claimed: list, writer: ShardWriter):
    """The box's mask (relative path, probe), or (None, None) with the reason recorded."""
    if not claimed:
        return None, None
    seg = claimed[0]
    try:
        mask_rel = reader.mask_relpath(seg.image_id, seg.mask_path)
    except reader.PathOutsideRoot as exc:
        writer.rejects.append(_mask_reject(seg, reasons.PATH_OUTSIDE_ROOT, str(exc)))
        return None, None
    if not (root / mask_rel).is_file():
        writer.rejects.append(_mask_reject(seg, reasons.MISSING_FILE, f"{mask_rel} does not exist"))
        return None, None
    try:
        mask = probe_mask((root / mask_rel).read_bytes(), width=image.width, height=image.height)
    except UnreadableFile as exc:
        writer.rejects.append(_mask_reject(seg, exc.reason, exc.detail))
        return None, None
    return mask_rel, mask

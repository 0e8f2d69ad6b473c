"""The ``export`` stage: training shards, one row per positive pair, held out by object or photo (flows.splits)."""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flows import ids
from flows.accounting import AccountingError
from flows.config.params import ExportParams, SourcesParams
from flows.pairs.join import SubjectFrame, iter_joined
from flows.paths import image_file
from flows.schemas import BACKGROUNDS, EXPORT, PAIRS, REJECTS
from flows.splits import SPLITS, SplitRule
from flows.tables import TableWriter, iter_rows, write_json_atomic

@functools.cache
def _clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer  # imports torch: only when captions are made

    return SimpleTokenizer()


def placeholder_token_index(caption: str, placeholder: str) -> int:
    """Position of ``placeholder`` in the CLIP tokenization of ``caption``, start token at 0.

    The BPE is CLIP's (open_clip ships it; SD1.5's text tokenizer is the same vocabulary), so this
    is the column of the placeholder in the model's ``input_ids``.
    """
    bpe = _clip_bpe()
    word = bpe.encode(placeholder)
    if len(word) != 1:
        raise ValueError(f"export.placeholder_token: {placeholder!r} is {len(word)} BPE tokens; pick a one-token word")
    tokens = bpe.encode(caption)
    if word[0] not in tokens:
        raise ValueError(f"caption {caption!r} does not hold the placeholder {placeholder!r} as a token")
    index = 1 + tokens.index(word[0])  # 1: the start-of-text token
    if 2 + len(tokens) > bpe.context_length:
        raise ValueError(f"caption {caption!r} is {len(tokens)} tokens; CLIP keeps {bpe.context_length - 2}")
    return index


def caption_for(class_name: str, params: ExportParams) -> tuple[str, int]:
    """(caption, token index of the placeholder in its CLIP tokenization, start token at 0)."""
    caption = params.caption_template.format(placeholder=params.placeholder_token, class_name=class_name)
    return caption, placeholder_token_index(caption, params.placeholder_token)


def resized_jpeg(path: Path, side: int, quality: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(JPEG bytes with shorter side ``side``, new (w, h), original (w, h))."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = side / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        original = image.size
        buf = io.BytesIO()
        image.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), size, original


def resized_rle(counts: bytes, original: tuple[int, int], size: tuple[int, int]) -> bytes:
    """Decode a COCO RLE at ``original`` (w, h), resize nearest to ``size``, encode again."""
    mask = mask_utils.decode({"size": [original[1], original[0]], "counts": counts})  # (H, W) uint8
    mask = np.asarray(Image.fromarray(mask * 255).resize(size, Image.NEAREST)) > 127
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


class ShardSink:
    """Rotating Parquet shards of one split: part-00000.parquet, part-00001.parquet, ..."""

    def __init__(self, folder: Path, rows_per_shard: int):
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.shards: list[str] = []
        self.rows = 0
        self._in_shard = 0  # rows given to the current shard
        self._writer: TableWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None or self._in_shard >= self.rows_per_shard:
            self.close()
            self._in_shard = 0
            path = self.folder / f"part-{len(self.shards):05d}.parquet"
            self._writer = TableWriter(path, EXPORT, buffer_rows=64)  # rows hold images: keep buffers small
            self.shards.append(path.name)
        self._writer.write_row(row)
        self._in_shard += 1
        self.rows += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _pairs_by_frame(pairs: Path) -> Iterator[tuple[str, list[dict]]]:
    group: list[dict] = []
    for row in iter_rows(pairs, PAIRS):
        if group and row["frame_id"] != group[0]["frame_id"]:
            yield group[0]["frame_id"], group
            group = []
        group.append(row)
    if group:
        yield group[0]["frame_id"], group


def export_shards(*, frames: Path, masks: Path, embeddings: Path, pairs: Path, pair_rejects: Path,
                  sources: SourcesParams, out_dir: Path, params: ExportParams) -> dict[str, Any]:
    """Write ``out_dir/{train,heldout}/part-*.parquet``, ``backgrounds.parquet``, ``stats.json``.

    Every joined frame is a reference here or in the pairs stage's rejects (no positive);
    :class:`AccountingError` if not.
    """
    sinks = {split: ShardSink(out_dir / split, params.rows_per_shard) for split in SPLITS}
    rule = SplitRule.from_params(params)
    backgrounds: set[str] = set()
    subjects = {split: set() for split in SPLITS}
    unpaired = {row["item_id"] for row in iter_rows(pair_rejects, REJECTS)}
    references = 0
    by_frame = _pairs_by_frame(pairs)
    pending = next(by_frame, None)
    for frame in iter_joined(frames, masks, embeddings):
        if pending is None or pending[0] != frame.frame_id:
            if frame.frame_id not in unpaired:
                raise AccountingError(f"{frame.frame_id}: no pair and no pairs reject")
            unpaired.discard(frame.frame_id)
            continue  # no positive: not a training sample (the pairs stage's rejects say why)
        references += 1
        _, frame_pairs = pending
        pending = next(by_frame, None)
        split = rule.of(frame.source, frame.subject_id, frame.image_path)
        subjects[split].add(frame.subject_id)
        for sample in _samples(frame, frame_pairs, sources, split, params):
            if sample["aug_background"] and rule.of_photo(sample["aug_background"]) != split:
                raise ValueError(f"{sample['sample_id']}: background {sample['aug_background']} is not in split "
                                 f"{split}; rerun pairs with this export.seed and export.heldout_fraction")
            if sample["aug_background"]:
                backgrounds.add(sample["aug_background"])
            sinks[split].write(sample)
    if pending is not None:
        raise ValueError(f"pairs for {pending[0]} do not follow the frames order")
    if unpaired:
        raise AccountingError(f"pairs rejects name {len(unpaired)} frames that are not in the joined tables, "
                              f"e.g. {sorted(unpaired)[0]}")
    for sink in sinks.values():
        sink.close()
    _write_backgrounds(sorted(backgrounds), sources, out_dir / "backgrounds.parquet", params)
    stats = {split: {"rows": sinks[split].rows, "shards": len(sinks[split].shards),
                     "subjects": len(subjects[split])} for split in SPLITS}
    stats["backgrounds"] = len(backgrounds)
    stats["reference_frames"] = references
    write_json_atomic(out_dir / "stats.json", stats)
    return stats


def _samples(frame: SubjectFrame, frame_pairs: list[dict], sources: SourcesParams,
             split: str, params: ExportParams) -> Iterator[dict[str, Any]]:
    """The training rows of one reference frame: its image and mask encoded once for all."""
    jpeg, size, original = resized_jpeg(image_file(sources, frame.source, frame.image_path),
                                        params.image_side, params.jpeg_quality)
    if original != frame.mask_size:
        raise ValueError(f"{frame.frame_id}: image is {original}, its mask {frame.mask_size}")
    mask_rle = resized_rle(frame.rle_counts, original, size)
    caption, index = caption_for(frame.class_name, params)
    for pair in frame_pairs:
        yield {
            "sample_id": pair["pair_id"], "split": split, "source": frame.source, "subject_id": frame.subject_id,
            "frame_id": frame.frame_id, "image_jpeg": jpeg, "width": size[0], "height": size[1],
            "mask_rle": mask_rle, "positive_frame_id": pair["positive_frame_id"], "aug_crop": pair["aug_crop"],
            "aug_scale": pair["aug_scale"], "aug_flip": pair["aug_flip"], "aug_background": pair["aug_background"],
            "aug_seed": pair["aug_seed"], "caption": caption, "placeholder_index": index,
            "class_name": frame.class_name, "r_ij": pair["r_ij"], "embedding_id": frame.frame_id,
            "positive_embedding_id": pair["positive_frame_id"] or frame.frame_id,
        }


def _write_backgrounds(paths: list[str], sources: SourcesParams, target: Path, params: ExportParams) -> None:
    with TableWriter(target, BACKGROUNDS, buffer_rows=64) as writer:
        for path in paths:
            jpeg, _, _ = resized_jpeg(image_file(sources, ids.OPENIMAGES, path), params.image_side, params.jpeg_quality)
            writer.write_row({"image_path": path, "image_jpeg": jpeg})

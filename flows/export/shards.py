"""The ``export`` stage: training shards, one row per positive pair, held out by object or photo (flows.splits)."""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flows import ids
from flows.accounting import AccountingError
from flows.cluster import Pool, absolute_sources, work_pool
from flows.config.params import ClusterParams, ExportParams, SourcesParams
from flows.errors import UserFacingError
from flows.pairs.join import SubjectFrame, iter_joined
from flows.parallel import ordered_map
from flows.progress import Progress
from flows.paths import image_file
from flows.schemas import BACKGROUNDS, EXPORT, PAIRS, REJECTS
from flows.splits import SPLITS, SplitRule, grouped_rule
from flows.resume import ResumableWork, library_versions, work_key
from flows.tables import TableWriter, count_rows, iter_batches, iter_rows, write_json_atomic

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
    """(JPEG bytes with shorter side ``side``, new (w, h), original (w, h)).

    A JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
    (PIL's ``draft``, never below the target size) before the bicubic resize: a 1920 x 1080
    frame for 512 px decodes at 960 x 540. Images at or below twice the target decode whole.
    """
    with Image.open(path) as image:
        original = image.size
        scale = side / min(original)
        size = (max(1, round(original[0] * scale)), max(1, round(original[1] * scale)))
        image.draft("RGB", size)  # a no-op unless a JPEG and at least 2x the target
        image = image.convert("RGB")
        buf = io.BytesIO()
        image.resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), size, original


def resized_rle(counts: bytes, original: tuple[int, int], size: tuple[int, int]) -> bytes:
    """Decode a COCO RLE at ``original`` (w, h), resize nearest to ``size``, encode again."""
    mask = mask_utils.decode({"size": [original[1], original[0]], "counts": counts})  # (H, W) uint8
    mask = np.asarray(Image.fromarray(mask * 255).resize(size, Image.NEAREST)) > 127
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]


@dataclass(frozen=True)
class ImageWork:
    """One image to resize for training, with the subject masks on it (an OpenImages photo has several)."""

    path: str
    side: int
    quality: int
    masks: tuple[tuple[str, bytes, tuple[int, int]], ...] = ()  # (frame_id, RLE counts, mask (w, h))


class ImageChangedError(UserFacingError, RuntimeError):
    """An image that ingest accepted no longer reads as it did: the source changed under the pipeline."""


_RERUN = "the source changed after ingest read it; rerun the pipeline from ingest (`dvc repro` does)"


def encode_image(work: ImageWork) -> tuple[bytes, tuple[int, int], list[bytes]]:
    """(JPEG bytes, their (w, h), each mask's RLE at that size): the image decoded once for all its masks.

    Ingest decoded every image before it was accepted, so one that fails here, or whose size
    differs from its masks', was replaced or damaged since: :class:`ImageChangedError`.
    """
    try:
        jpeg, size, original = resized_jpeg(Path(work.path), work.side, work.quality)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # missing, truncated, not an image
        raise ImageChangedError(f"{work.path}: {type(exc).__name__}: {exc}; {_RERUN}") from exc
    rles = []
    for frame_id, counts, mask_size in work.masks:
        if original != mask_size:
            raise ImageChangedError(f"{frame_id}: image {work.path} is {original}, its mask {mask_size}; {_RERUN}")
        rles.append(resized_rle(counts, original, size))
    return jpeg, size, rles


class ShardSink:
    """Rotating Parquet shards of one split: part-00000.parquet, part-00001.parquet, ...

    ``first``: the number of the next shard (shards of finished chunks come before it).
    """

    def __init__(self, folder: Path, rows_per_shard: int, first: int = 0):
        self.folder, self.rows_per_shard = folder, rows_per_shard
        self.next = first
        self.new: list[Path] = []  # shards begun since the last take_new()
        self._in_shard = 0  # rows given to the current shard
        self._writer: TableWriter | None = None

    def write(self, row: dict[str, Any]) -> None:
        if self._writer is None or self._in_shard >= self.rows_per_shard:
            self.close()
            self._in_shard = 0
            path = self.folder / f"part-{self.next:05d}.parquet"
            self._writer = TableWriter(path, EXPORT, buffer_rows=64)  # rows hold images: keep buffers small
            self.new.append(path)
            self.next += 1
        self._writer.write_row(row)
        self._in_shard += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def take_new(self) -> list[Path]:
        """Close the current shard; the shards begun since the last call."""
        self.close()
        new, self.new = self.new, []
        return new


def _pairs_by_frame(pairs: Path) -> Iterator[tuple[str, list[dict]]]:
    group: list[dict] = []
    for row in iter_rows(pairs, PAIRS):
        if group and row["frame_id"] != group[0]["frame_id"]:
            yield group[0]["frame_id"], group
            group = []
        group.append(row)
    if group:
        yield group[0]["frame_id"], group


log = logging.getLogger("flows.export")

CHUNK_REFERENCES = 65_536  # reference frames per resumable chunk (minutes of a many-core machine)


def export_shards(*, frames: Path, masks: Path, embeddings: Path, pairs: Path, pair_rejects: Path,
                  sources: SourcesParams, out_dir: Path, params: ExportParams,
                  chunk_references: int = CHUNK_REFERENCES, cluster: ClusterParams | None = None,
                  near_duplicates: Path | None = None) -> dict[str, Any]:
    """Write ``out_dir/{train,heldout}/part-*.parquet``, ``backgrounds.parquet``, ``stats.json``.

    Every joined frame is a reference here or in the pairs stage's rejects (no positive);
    :class:`AccountingError` if not. Images are resized in ``params.workers`` processes, in
    order, so the shards are the same for any number of workers; with ``cluster.address`` they are
    encoded on that Dask cluster's workers instead (flows.cluster), with the same result.

    The shards are written in chunks of about ``chunk_references`` references into a resumable
    work folder (flows.resume, ``out_dir/.work``); a chunk ends its shards (the last may be
    short) and is then marked done, so a failed run keeps its finished chunks and the next run
    with the same inputs, params and code encodes only the rest. The shards move into
    ``out_dir`` at the end; the stats are counted from them.

    ``near_duplicates`` (the similarity stage's table) groups the splits when
    ``params.group_near_duplicates`` (flows.splits); the stats then count the groups.
    """
    rule, grouped = grouped_rule(params, near_duplicates, frames)
    grouping = grouped.summary(rule) if grouped else None
    if grouping:
        log.info("export: %d near-duplicate subject pairs join %d objects/photos into %d groups (the largest: %d); "
                 "the grouping changed the split of %d", grouping["pairs"], grouping["units"], grouping["groups"],
                 grouping["largest"], grouping["units_moved"])
    inputs = [frames, masks, embeddings, pairs, pair_rejects]
    keyed = inputs + ([near_duplicates] if grouped else [])
    work = ResumableWork(out_dir / ".work", work_key(inputs=keyed, code=["export", "pairs/join.py", "splits.py",
                                                                       "parallel.py", "cluster.py"], params={
        "export": dataclasses.replace(params, workers=1, out_dir=""), "sources": sources,
        "chunk_references": chunk_references,
        "versions": library_versions("pillow", "numpy", "pycocotools", "open_clip_torch", "pyarrow")}))
    with work_pool(cluster, local_workers=params.workers) as pool:
        if pool.executor is not None:  # the workers run in other folders, maybe on other machines
            sources = absolute_sources(sources)
            log.info("export: image work goes to the Dask cluster at %s (%d worker threads)", pool.where, pool.workers)
        return _export_in(work, pool, inputs, sources, rule, out_dir, params, chunk_references, grouping)


def _export_in(work: ResumableWork, pool: Pool, inputs: list[Path], sources: SourcesParams, rule: SplitRule,
               out_dir: Path, params: ExportParams, chunk_references: int,
               grouping: dict | None) -> dict[str, Any]:
    frames, masks, embeddings, pairs, pair_rejects = inputs
    work.open()
    finished = work.done_prefix("chunk")
    sinks = {split: ShardSink(work.folder / split, params.rows_per_shard,
                              first=sum(len(r["shards"][split]) for r in finished)) for split in SPLITS}
    references = _ReferenceGroups(frames, masks, embeddings, pairs, pair_rejects, sources, rule, params)
    todo = ((item, image) for item, image in _chunked(references, chunk_references) if item[0] >= len(finished))
    # samples (pair rows) still to write: what finished chunks wrote is not this run's work
    progress = Progress("export", count_rows(pairs) - sum(record["samples"] for record in finished), unit="samples")
    current = None  # the chunk being written
    try:
        with closing(ordered_map(encode_image, todo, workers=pool.workers, executor=pool.executor)) as encoded:
            for (chunk, group, last), (jpeg, size, rles) in encoded:
                current = chunk
                for (frame, frame_pairs, split), mask_rle in zip(group, rles, strict=True):
                    for sample in _samples(frame, frame_pairs, split, jpeg, size, mask_rle, params):
                        if sample["aug_background"] and rule.of_photo(sample["aug_background"]) != split:
                            raise ValueError(f"{sample['sample_id']}: background {sample['aug_background']} is not "
                                             f"in split {split}; rerun pairs with this export.seed, "
                                             f"export.heldout_fraction, export.group_near_duplicates and the "
                                             f"similarity stage's near_duplicates.parquet")
                        sinks[split].write(sample)
                progress.update(sum(len(frame_pairs) for _, frame_pairs, _ in group))
                if last:  # done as soon as its last group is written, whatever fails after
                    finished.append(_finish_chunk(work, chunk, sinks))
                    current = None
        if current is not None:  # the final chunk, short of chunk_references
            finished.append(_finish_chunk(work, current, sinks))
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    progress.close()
    # Everything that can fail happens while the shards are still in .work (and their records valid);
    # then only renames. Only the shards the records name move: no temp file of a killed writer.
    shards = {split: [work.folder / split / name for record in finished for name in record["shards"][split]]
              for split in SPLITS}
    stats, backgrounds = _count_shards(shards)
    _write_backgrounds(sorted(backgrounds), sources, out_dir / "backgrounds.parquet", params, pool)
    stats["reference_frames"] = references.count
    if grouping is not None:
        stats["near_duplicate_groups"] = grouping
    _check_split_sizes(stats, params, grouping)
    for split in SPLITS:  # the finished shards replace the previous run's; a split without rows is an empty folder
        shutil.rmtree(out_dir / split, ignore_errors=True)
        (out_dir / split).mkdir(parents=True)
        for shard in shards[split]:
            os.replace(shard, out_dir / split / shard.name)
    write_json_atomic(out_dir / "stats.json", stats)
    work.finish()
    return stats


def _check_split_sizes(stats: dict, params: ExportParams, grouping: dict | None) -> None:
    """Log a held-out split that is empty, or (from 1,000 rows on) off its fraction by more than 2x:
    a large near-duplicate group lands in one split as a whole."""
    held, rows = stats["heldout"]["rows"], stats["heldout"]["rows"] + stats["train"]["rows"]
    if not (rows and params.heldout_fraction > 0):
        return
    share = held / rows
    if held and (rows < 1000 or params.heldout_fraction / 2 <= share <= 2 * params.heldout_fraction):
        return
    group = (f"; the largest near-duplicate group holds {grouping['largest']} objects/photos, and a group lands in "
             f"one split (similarity.near_duplicate_r, export.group_near_duplicates)"
             if grouping and grouping["largest"] > 1 else "")
    log.warning("export: the held-out split has %d of %d rows (%.1f%%; export.heldout_fraction %s)%s", held, rows,
                100 * share, params.heldout_fraction, group)


def _chunked(references: Iterable[tuple[list, ImageWork]],
             size: int) -> Iterator[tuple[tuple[int, list, bool], ImageWork]]:
    """((chunk number, group, whether it is the chunk's last group), image work).

    A chunk closes after the group that brings it to ``size`` references (the final chunk
    may close short; the stream's end tells).
    """
    chunk, in_chunk = 0, 0
    for group, image in references:
        in_chunk += len(group)
        last = in_chunk >= size
        yield (chunk, group, last), image
        if last:
            chunk, in_chunk = chunk + 1, 0


def _finish_chunk(work: ResumableWork, chunk: int, sinks: dict[str, ShardSink]) -> dict:
    """Close the chunk's shards (each written atomically), then mark the chunk done; returns its record."""
    shards = {split: sink.take_new() for split, sink in sinks.items()}
    record = {"shards": {split: [p.name for p in paths] for split, paths in shards.items()},
              "samples": sum(count_rows(path) for paths in shards.values() for path in paths)}
    work.mark_done(f"chunk-{chunk:05d}", record, files=[path for paths in shards.values() for path in paths])
    return record


def _count_shards(shards: dict[str, list[Path]]) -> tuple[dict[str, Any], set[str]]:
    """Rows, shards and subjects per split, from the shards themselves; and the backgrounds they use."""
    stats: dict[str, Any] = {}
    backgrounds: set[str] = set()
    for split in SPLITS:
        subjects: set[str] = set()
        rows = 0
        for shard in shards[split]:
            for batch in iter_batches(shard, EXPORT, columns=["subject_id", "aug_background"]):
                rows += batch.num_rows
                subjects.update(batch.column("subject_id").to_pylist())
                backgrounds.update(b for b in batch.column("aug_background").to_pylist() if b)
        stats[split] = {"rows": rows, "shards": len(shards[split]), "subjects": len(subjects)}
    stats["backgrounds"] = len(backgrounds)
    return stats, backgrounds


Reference = tuple[SubjectFrame, list[dict], str]  # (frame, its pairs, its split)


class _ReferenceGroups:
    """The reference frames in table order, grouped by image: ``(references, ImageWork)`` items.

    Consecutive frames on one image (the boxes of an OpenImages photo) form one group, so the
    photo is decoded and encoded once. Frames without pairs are checked against the pairs
    stage's rejects and skipped; ``count`` is the number of references once iterated.
    """

    def __init__(self, frames, masks, embeddings, pairs, pair_rejects, sources: SourcesParams, rule: SplitRule,
                 params: ExportParams):
        self.inputs = frames, masks, embeddings
        self.pairs, self.pair_rejects = pairs, pair_rejects
        self.sources, self.rule, self.params = sources, rule, params
        self.count = 0

    def __iter__(self) -> Iterator[tuple[list[Reference], ImageWork]]:
        group: list[Reference] = []
        for reference in self._references():
            if group and (reference[0].source, reference[0].image_path) != (group[0][0].source, group[0][0].image_path):
                yield group, self._work(group)
                group = []
            group.append(reference)
        if group:
            yield group, self._work(group)

    def _work(self, group: list[Reference]) -> ImageWork:
        first = group[0][0]
        return ImageWork(path=str(image_file(self.sources, first.source, first.image_path)), side=self.params.image_side,
                         quality=self.params.jpeg_quality,
                         masks=tuple((f.frame_id, f.rle_counts, f.mask_size) for f, _, _ in group))

    def _references(self) -> Iterator[Reference]:
        unpaired = {row["item_id"] for row in iter_rows(self.pair_rejects, REJECTS)}
        by_frame = _pairs_by_frame(self.pairs)
        pending = next(by_frame, None)
        for frame in iter_joined(*self.inputs):
            if pending is None or pending[0] != frame.frame_id:
                if frame.frame_id not in unpaired:
                    raise AccountingError(f"{frame.frame_id}: no pair and no pairs reject")
                unpaired.discard(frame.frame_id)
                continue  # no positive: not a training sample (the pairs stage's rejects say why)
            self.count += 1
            yield frame, pending[1], self.rule.of(frame.source, frame.subject_id, frame.image_path)
            pending = next(by_frame, None)
        if pending is not None:
            raise ValueError(f"pairs for {pending[0]} do not follow the frames order")
        if unpaired:
            raise AccountingError(f"pairs rejects name {len(unpaired)} frames that are not in the joined tables, "
                                  f"e.g. {sorted(unpaired)[0]}")


def _samples(frame: SubjectFrame, frame_pairs: list[dict], split: str, jpeg: bytes, size: tuple[int, int],
             mask_rle: bytes, params: ExportParams) -> Iterator[dict[str, Any]]:
    """The training rows of one reference frame, sharing its encoded image and mask."""
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


def _write_backgrounds(paths: list[str], sources: SourcesParams, target: Path, params: ExportParams,
                       pool: Pool) -> None:
    work = ((path, ImageWork(path=str(image_file(sources, ids.OPENIMAGES, path)), side=params.image_side,
                             quality=params.jpeg_quality)) for path in paths)
    with TableWriter(target, BACKGROUNDS, buffer_rows=64) as writer, \
            closing(ordered_map(encode_image, work, workers=pool.workers, executor=pool.executor)) as encoded:
        for path, (jpeg, _, _) in encoded:
            writer.write_row({"image_path": path, "image_jpeg": jpeg})

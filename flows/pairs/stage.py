"""The ``pairs`` stage as plain functions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from flows import ids
from flows.config.params import PairsParams
from flows.accounting import FRAME, reject_row
from flows.pairs.join import SubjectFrame, iter_joined, iter_subjects
from flows.pairs.mining import PairStats, mine_pairs
from flows.reasons import NO_POSITIVE
from flows.schemas import FRAMES, PAIRS, REJECTS
from flows.splits import SPLITS, SplitRule
from flows.tables import TableWriter, iter_batches, write_json_atomic

BACKGROUND_POOL = 512  # distinct OpenImages photos that augmentation recipes draw backgrounds from


def background_pool(frames: Path, split: SplitRule, limit: int = BACKGROUND_POOL) -> dict[str, list[str]]:
    """Per split, the first ``limit`` distinct accepted OpenImages photos of that split, in table order."""
    pool: dict[str, dict[str, None]] = {name: {} for name in SPLITS}
    for batch in iter_batches(frames, FRAMES, columns=["source", "image_path"]):
        for source, path in zip(batch.column("source").to_pylist(), batch.column("image_path").to_pylist()):
            if source == ids.OPENIMAGES:
                photos = pool[split.of_photo(path)]
                if len(photos) < limit:
                    photos.setdefault(path)
        if all(len(photos) >= limit for photos in pool.values()):
            break
    return {name: list(photos) for name, photos in pool.items()}


def captured_frames(ingested: Path) -> dict[str, int]:
    """Frames per MVImgNet object in ingest's frames table (every frame ingest could read)."""
    counts: Counter[str] = Counter()
    for batch in iter_batches(ingested, FRAMES, columns=["source", "subject_id"]):
        counts.update(s for source, s in zip(batch.column("source").to_pylist(), batch.column("subject_id").to_pylist())
                      if source == ids.MVIMGNET)
    return dict(counts)


def build_pairs(frames: Path, masks: Path, embeddings: Path, out_dir: Path, params: PairsParams,
                split: SplitRule, ingested: Path | None = None) -> dict:
    """Write ``out_dir/pairs.parquet``, ``rejects.parquet`` (frames left without a positive) and
    ``stats.json``; return the stats.

    ``ingested``: ingest's frames table, for the size of each object's capture (the frame-gap
    fallback); None counts the frames that reached this stage."""
    stats = PairStats()
    subjects = iter_subjects(iter_joined(frames, masks, embeddings))
    with TableWriter(out_dir / "pairs.parquet", PAIRS) as writer, \
            TableWriter(out_dir / "rejects.parquet", REJECTS) as rejects:

        def unpaired(frame: SubjectFrame, detail: str) -> None:
            rejects.write_row(reject_row(item_id=frame.frame_id, source=frame.source, kind=FRAME,
                                         path=frame.image_path, stage="pairs", reason=NO_POSITIVE, detail=detail))

        captured = captured_frames(ingested) if ingested is not None else {}
        writer.write_rows(mine_pairs(subjects, background_pool(frames, split), params, stats, unpaired, split, captured))
    # backgrounds come from the frame's split: which rule drew them (export checks it against its own)
    result = {**stats.as_dict(), "split": {"heldout_fraction": split.heldout_fraction, "seed": split.seed,
                                           "near_duplicate_grouped_units": len(split.groups)}}
    write_json_atomic(out_dir / "stats.json", result)
    return result

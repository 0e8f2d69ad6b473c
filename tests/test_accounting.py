"""frame_counts: kept frames per source and the rejects of one stage, frames apart from annotations."""

from __future__ import annotations

from pipeline_tables import frame

from flows import reasons
from flows.accounting import ANNOTATION, FRAME, frame_counts, reject_row
from flows.schemas import FRAMES, REJECTS
from flows.tables import write_table


def _reject(item_id, source, kind, stage, reason):
    return reject_row(item_id=item_id, source=source, kind=kind, path=f"{item_id}.jpg", stage=stage, reason=reason,
                      detail="test")


def _write(tmp_path):
    frames = [frame(f"mvimgnet:1/aaaaaaaa/{k:03d}.jpg", "mvimgnet:1/aaaaaaaa", "mvimgnet", k) for k in range(3)]
    frames.append(frame("openimages:0001/k", "openimages:0001/k", "openimages", path="train/0001.jpg"))
    write_table(tmp_path / "frames.parquet", FRAMES, frames)
    rejects = [
        _reject("mvimgnet:1/aaaaaaaa/003.jpg", "mvimgnet", FRAME, "filter", reasons.BLURRY),
        _reject("mvimgnet:1/aaaaaaaa/004.jpg", "mvimgnet", FRAME, "filter", reasons.BLURRY),
        _reject("openimages:0002/k", "openimages", FRAME, "filter", reasons.LOW_RESOLUTION),
        _reject("mvimgnet:1/aaaaaaaa/mask.png", "mvimgnet", ANNOTATION, "filter", reasons.BAD_ANNOTATION),
        _reject("mvimgnet:1/aaaaaaaa/005.jpg", "mvimgnet", FRAME, "ingest", reasons.MISSING_FILE),
        _reject("openimages:0003/k", "openimages", FRAME, "ingest", reasons.MISSING_FILE),
        _reject("openimages:masks/x.png", "openimages", ANNOTATION, "ingest", reasons.BAD_ANNOTATION),
    ]
    write_table(tmp_path / "rejects.parquet", REJECTS, rejects)
    return tmp_path / "frames.parquet", tmp_path / "rejects.parquet"


def test_frame_counts_count_only_this_stages_frame_rejects(tmp_path):
    frames, rejects = _write(tmp_path)
    assert frame_counts(frames, rejects, stage="filter") == {
        "mvimgnet": {"kept": 3, "rejected": 2, "reasons": {reasons.BLURRY: 2},
                     "annotation_rejects": {reasons.BAD_ANNOTATION: 1}},
        "openimages": {"kept": 1, "rejected": 1, "reasons": {reasons.LOW_RESOLUTION: 1}, "annotation_rejects": {}},
    }


def test_frame_counts_of_another_stage_and_of_a_stage_without_rejects(tmp_path):
    frames, rejects = _write(tmp_path)
    assert frame_counts(frames, rejects, stage="ingest") == {
        "mvimgnet": {"kept": 3, "rejected": 1, "reasons": {reasons.MISSING_FILE: 1}, "annotation_rejects": {}},
        "openimages": {"kept": 1, "rejected": 1, "reasons": {reasons.MISSING_FILE: 1},
                       "annotation_rejects": {reasons.BAD_ANNOTATION: 1}},
    }
    assert frame_counts(frames, rejects, stage="pairs") == {
        "mvimgnet": {"kept": 3, "rejected": 0, "reasons": {}, "annotation_rejects": {}},
        "openimages": {"kept": 1, "rejected": 0, "reasons": {}, "annotation_rejects": {}},
    }

"""flows.filtering.stage: what the filter's rejects say."""

from __future__ import annotations

import json

from flows import reasons
from flows.accounting import ANNOTATION, reject_row
from flows.config.params import FilterParams
from flows.filtering.stage import filter_frames
from flows.schemas import FRAMES, REJECTS
from flows.tables import iter_rows, write_table
from pipeline_tables import frame


def _frames(subjects: dict[str, int]) -> list[dict]:
    """MVImgNet frames that pass every per-frame rule: ``views`` of each subject, none alike."""
    rows = []
    for subject, views in subjects.items():
        for v in range(views):
            n = len(rows)
            row = frame(f"{subject}/{v:03d}.jpg", subject, "mvimgnet", v, path=f"{subject[9:]}/images/{v:03d}.jpg")
            phash = int.from_bytes(bytes([n] * 8), "big")  # 8 bits apart per step: never near
            rows.append({**row, "content_hash": f"{n:016x}" * 4, "phash": phash, "width": 640, "height": 480,
                         "mask_path": f"{subject[9:]}/{v:03d}.jpg.png"})
    return rows


def _filter(tmp_path, rows, ingest_rejects=()):
    ingest = tmp_path / "ingest"
    write_table(ingest / "frames.parquet", FRAMES, rows)
    write_table(ingest / "rejects.parquet", REJECTS, list(ingest_rejects))
    (ingest / "summary.json").write_text(json.dumps({"mvimgnet": {"discovered": len(rows) + len(ingest_rejects)}}))
    metrics = filter_frames(ingest, tmp_path / "filter", FilterParams())
    return metrics, list(iter_rows(tmp_path / "filter" / "rejects.parquet", REJECTS))


def test_an_image_is_not_rejected_as_the_copy_of_one_dropped_for_its_objects_views(tmp_path):
    # object a (3 views, fewer than filter.min_views_per_object) comes first; b's last frame is a's first
    rows = _frames({"mvimgnet:1/aaaaaaaa": 3, "mvimgnet:1/bbbbbbbb": 5})
    rows[-1] = {**rows[-1], "content_hash": rows[0]["content_hash"], "phash": rows[0]["phash"]}
    assert FilterParams().min_views_per_object == 4
    metrics, rejects = _filter(tmp_path, rows)
    assert {r["item_id"]: r["reason"] for r in rejects} == {row["frame_id"]: reasons.TOO_FEW_VIEWS for row in rows[:3]}
    assert metrics["mvimgnet"]["accepted"] == 5  # before: b's copy went as a duplicate of a frame dropped with a


def test_a_duplicates_reject_names_the_image_it_copies(tmp_path):
    rows = _frames({"mvimgnet:1/aaaaaaaa": 5, "mvimgnet:1/bbbbbbbb": 6})
    rows[-1] = {**rows[-1], "content_hash": rows[0]["content_hash"], "phash": rows[0]["phash"]}
    rows[-2] = {**rows[-2], "phash": rows[1]["phash"] ^ 0b101}  # 2 bits from a's second frame
    metrics, rejects = _filter(tmp_path, rows)
    assert [(r["item_id"], r["reason"], r["detail"].rsplit(": ", 1)[1]) for r in rejects] == [
        (rows[-2]["frame_id"], reasons.NEAR_DUPLICATE, "mvimgnet:1/aaaaaaaa/images/001.jpg"),
        (rows[-1]["frame_id"], reasons.DUPLICATE, "mvimgnet:1/aaaaaaaa/images/000.jpg"),
    ]
    assert metrics["mvimgnet"]["accepted"] == 9


def test_a_missing_mask_says_whether_the_file_was_absent_or_did_not_read(tmp_path):
    ingest = tmp_path / "ingest"
    rows = []
    for k, phash in enumerate((0, 0xFFFF_FFFF_FFFF_FFFF)):  # far apart: no near-duplicates
        row = frame(f"mvimgnet:1/{k:08d}/001.jpg", f"mvimgnet:1/{k:08d}", "mvimgnet", 0)
        rows.append({**row, "content_hash": f"{k:02d}" * 32, "phash": phash, "width": 640, "height": 480})
    write_table(ingest / "frames.parquet", FRAMES, rows)
    broken = reject_row(item_id=f"{rows[1]['frame_id']}#mask", source="mvimgnet", kind=ANNOTATION,
                        path="1/00000001/001.jpg.png", stage="ingest", reason=reasons.UNREADABLE_MASK,
                        detail="mask does not decode: truncated; frame kept without mask")
    write_table(ingest / "rejects.parquet", REJECTS, [broken])
    (ingest / "summary.json").write_text(json.dumps({"mvimgnet": {"discovered": 2}}))
    metrics = filter_frames(ingest, tmp_path / "filter", FilterParams())
    assert metrics["mvimgnet"]["reasons"] == {"filter/missing_mask": 2}  # one count: no usable mask
    details = {r["item_id"]: r["detail"] for r in iter_rows(tmp_path / "filter" / "rejects.parquet", REJECTS)
               if r["reason"] == reasons.MISSING_MASK}
    assert details == {
        rows[0]["frame_id"]: "no mask for this frame in the MVImgNet mask tree",
        rows[1]["frame_id"]: "its mask file is in the mask tree but did not read (unreadable_mask: mask does not "
                             "decode: truncated; frame kept without mask)",
    }

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

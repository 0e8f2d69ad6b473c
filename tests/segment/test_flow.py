"""The segment stage through its Prefect flow, as `python -m flows.segment` runs it."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.schemas import MASKS
from flows.tables import iter_rows


def test_flow_writes_masks_rejects_and_stats(prefect_harness, segment_data, tmp_path):
    from flows.segment.flow import segment_flow

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "sources": {"mvimgnet_root": segment_data.sources.mvimgnet_root,
                    "mvimgnet_mask_root": segment_data.sources.mvimgnet_mask_root,
                    "openimages_root": segment_data.sources.openimages_root},
        "filter": {"out_dir": segment_data.filtering.out_dir},
        "segment": {"out_dir": segment_data.params.out_dir, "batch_images": 2, "frames_per_shard": 3},
    }))
    stats = segment_flow(str(params))
    out = Path(segment_data.params.out_dir)
    assert stats["input_frames"] == len(segment_data.rows) == stats["masks"] + stats["rejected"]
    assert stats["sam"]["random_weights"] and stats["sam"]["model_id"] == "sam:tiny:random-seed0"
    assert [r["frame_id"] for r in iter_rows(out / "masks.parquet", MASKS)] == [
        r["frame_id"] for r in segment_data.rows if r["frame_id"] not in segment_data.faults
        and r["frame_id"] in {m["frame_id"] for m in iter_rows(out / "masks.parquet", MASKS)}]
    assert (out / "stats.json").is_file() and not (out / ".work").exists()

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


def _here_and_there(segment_data, tmp_path, monkeypatch, address):
    """The flow's outputs run here and on the cluster at ``address``: (stats, masks, rejects, stats.json) each."""
    import json
    import os

    from flows.schemas import REJECTS
    from flows.segment.flow import segment_flow

    monkeypatch.chdir(tmp_path)  # every path relative to here; the workers run in another folder
    rel = lambda path: os.path.relpath(path, tmp_path)  # noqa: E731
    outputs = {}
    for name, where in (("here", None), ("there", address)):
        params = tmp_path / f"{name}.yaml"
        params.write_text(yaml.safe_dump({
            "sources": {"mvimgnet_root": rel(segment_data.sources.mvimgnet_root),
                        "mvimgnet_mask_root": rel(segment_data.sources.mvimgnet_mask_root),
                        "openimages_root": rel(segment_data.sources.openimages_root)},
            "filter": {"out_dir": rel(segment_data.filtering.out_dir)},
            "segment": {"out_dir": f"segment-{name}", "batch_images": 2, "frames_per_shard": 2},
            "cluster": {"address": where},
        }))
        stats = segment_flow(str(params))
        out = tmp_path / f"segment-{name}"
        outputs[name] = (stats, list(iter_rows(out / "masks.parquet", MASKS)), list(iter_rows(out / "rejects.parquet", REJECTS)),
                         json.loads((out / "stats.json").read_text()))
        assert not (out / ".work").exists()
    return outputs["here"], outputs["there"]


def test_shards_segmented_on_a_dask_cluster_equal_those_segmented_here(prefect_harness, segment_data, tmp_path,
                                                                       monkeypatch, dask_cluster):
    here, there = _here_and_there(segment_data, tmp_path, monkeypatch, dask_cluster.scheduler_address)
    assert here == there
    assert here[0]["methods"].get("sam_box", 0) > 0 and len(here[1]) > 3  # SAM ran, on several shards


def test_a_worker_of_several_threads_builds_one_sam_and_gives_the_same_masks(prefect_harness, segment_data,
                                                                             tmp_path, monkeypatch):
    import logging

    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=3, processes=True, dashboard_address=":0",
                      silence_logs=logging.WARNING) as cluster:
        here, there = _here_and_there(segment_data, tmp_path, monkeypatch, cluster.scheduler_address)
    assert here == there

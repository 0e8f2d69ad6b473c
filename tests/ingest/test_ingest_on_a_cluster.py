"""The ingest flow with its shards probed on a real Dask cluster gives what it gives on this machine."""

import json

import yaml
from test_ingest_shards import BOX_HEADER, SEG_HEADER, jpeg, png_mask

from flows.schemas import FRAMES, REJECTS
from flows.tables import iter_rows


def _data(root):
    """Two MVImgNet objects (one frame truncated) and an OpenImages split of three photos (one empty)."""
    for obj, seed in (("0000beef", 1), ("0000cafe", 5)):
        images = root / "mv" / "5" / obj / "images"
        images.mkdir(parents=True)
        (root / "masks" / "5" / obj).mkdir(parents=True)
        for i in range(1, 4):
            (images / f"00{i}.jpg").write_bytes(jpeg(seed + i))
        (root / "masks" / "5" / obj / "001.jpg.png").write_bytes(png_mask((320, 240), (80, 60, 240, 180)))
    (root / "mv" / "5" / "0000cafe" / "images" / "003.jpg").write_bytes(jpeg(9)[:400])
    (root / "mv" / "cats.txt").write_text("5,teapot\n")
    oi = root / "oi"
    (oi / "train").mkdir(parents=True)
    (oi / "train" / "a000000000000001.jpg").write_bytes(jpeg(11))
    (oi / "train" / "a000000000000002.jpg").write_bytes(jpeg(12))
    (oi / "train" / "a000000000000003.jpg").write_bytes(b"")
    (oi / "classes.csv").write_text("LabelName,DisplayName\n/m/01,Mug\n")
    (oi / "boxes.csv").write_text(BOX_HEADER + "".join(
        f"a00000000000000{i},xclick,/m/01,1,0.2,0.8,0.2,0.8,0,0,0,0,0\n" for i in (1, 2, 3)))
    (oi / "seg.csv").write_text(SEG_HEADER)


def _params(path, out_dir, address):
    path.write_text(yaml.safe_dump({
        "sources": {"mvimgnet_root": "mv", "mvimgnet_mask_root": "masks", "mvimgnet_categories": "mv/cats.txt",
                    "openimages_root": "oi", "openimages_boxes_csv": "boxes.csv",
                    "openimages_segmentation_csv": "seg.csv", "openimages_classes_csv": "classes.csv"},
        "ingest": {"out_dir": out_dir, "frames_per_shard": 2, "max_workers": 2, "probe_side": 64},
        "cluster": {"address": address},
    }))
    return str(path)


def test_ingest_on_a_dask_cluster_equals_ingest_here(tmp_path, monkeypatch, prefect_harness, dask_cluster):
    from flows.ingest.flow import ingest_flow

    _data(tmp_path)
    monkeypatch.chdir(tmp_path)  # every path in params is relative to here; the workers run elsewhere
    here = ingest_flow(_params(tmp_path / "here.yaml", "here", None))
    there = ingest_flow(_params(tmp_path / "there.yaml", "there", dask_cluster.scheduler_address))
    assert here == there and here["mvimgnet"]["kept"] == 5 and here["openimages"]["kept"] == 2
    for name, schema in (("frames.parquet", FRAMES), ("rejects.parquet", REJECTS)):
        assert list(iter_rows(tmp_path / "here" / name, schema)) == list(iter_rows(tmp_path / "there" / name, schema))
    assert json.loads((tmp_path / "there" / "summary.json").read_text()) == here
    assert not (tmp_path / "there" / ".work").exists()

"""Small frames / masks / embeddings tables with known poses, in the real schemas (fixture ``tables``)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from flows.readers.colmap import rotmat_to_qvec
from flows.schemas import FRAMES, MASKS, embeddings_schema
from flows.tables import write_table

DIM = 8


def orbit_qvec(deg: float):
    a = np.radians(deg)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    return list(rotmat_to_qvec(rot))


def frame(fid, subject, source, index=None, qvec=None, path=None):
    return {"frame_id": fid, "source": source, "subject_id": subject, "class_id": "1", "class_name": "cup",
            "image_path": path or f"{fid}.jpg", "width": 100, "height": 80, "frame_index": index,
            "pose_qvec": qvec, "pose_tvec": None if qvec is None else [0.0, 0.0, 3.0],
            "box_xmin": 0.2, "box_ymin": 0.2, "box_xmax": 0.6, "box_ymax": 0.7, "mask_path": None,
            "content_hash": "00" * 32, "phash": 0, "blur_score": 100.0, "subject_area_frac": 0.2,
            "mask_largest_cc_frac": 1.0, "is_group_of": None, "is_depiction": None, "is_occluded": None,
            "is_truncated": None}


def _rle() -> bytes:
    mask = np.zeros((80, 100), dtype=np.uint8)
    mask[16:56, 20:60] = 1
    return mask_utils.encode(np.asfortranarray(mask))["counts"]


def mask_row(fid, subject, area=0.2):
    return {"frame_id": fid, "subject_id": subject, "width": 100, "height": 80, "rle_counts": _rle(),
            "bbox_x": 20.0, "bbox_y": 16.0, "bbox_w": 40.0, "bbox_h": 40.0, "area_frac": area,
            "quality": 1.0, "method": "provided", "model_id": None}


@pytest.fixture
def tables(tmp_path):
    """Object A: 8 views every 45 deg with poses. Object B: 8 frames without poses.
    Two OpenImages boxes. Frame A/003 has no mask row; B/007 has no embedding."""
    rng = np.random.default_rng(0)
    frames, masks, embs = [], [], []
    for name, posed in (("a", True), ("b", False)):
        subject = f"mvimgnet:1/{name * 8}"
        for k in range(8):
            fid = f"{subject}/{k:03d}.jpg"
            frames.append(frame(fid, subject, "mvimgnet", k, orbit_qvec(45 * k) if posed else None))
            if fid != "mvimgnet:1/aaaaaaaa/003.jpg":
                masks.append(mask_row(fid, subject, area=0.1 + 0.01 * k))
            if fid != "mvimgnet:1/bbbbbbbb/007.jpg":
                embs.append(fid)
    for img in ("0001", "0002"):
        fid = f"openimages:{img}/k"
        frames.append(frame(fid, fid, "openimages", path=f"train/{img}.jpg"))
        masks.append(mask_row(fid, fid))
        embs.append(fid)
    vectors = rng.normal(size=(len(embs), DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_table(tmp_path / "frames.parquet", FRAMES, frames)
    write_table(tmp_path / "masks.parquet", MASKS, masks)
    write_table(tmp_path / "embeddings.parquet", embeddings_schema(DIM),
                [{"frame_id": f, "subject_id": f.rsplit("/", 1)[0] if f.startswith("mv") else f,
                  "embedding": v.astype(np.float16).tolist(), "model_id": "test"} for f, v in zip(embs, vectors)])
    return tmp_path


def write_images(tables_dir, root):
    """A JPEG at ``root/<image_path>`` for every frame of the ``tables`` fixture."""
    from PIL import Image

    from flows.schemas import FRAMES
    from flows.tables import iter_rows

    rng = np.random.default_rng(1)
    for row in iter_rows(tables_dir / "frames.parquet", FRAMES):
        path = root / row["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(path, quality=90)


def near_duplicates_of(tables_dir):
    """The similarity stage's near_duplicates.parquet for the fixture: run on its embeddings unless
    a test wrote one."""
    from flows.config.params import SimilarityParams
    from flows.similarity.stage import compute_similarity

    out = tables_dir / "similarity"
    if not (out / "near_duplicates.parquet").exists():
        compute_similarity(tables_dir / "embeddings.parquet", out, SimilarityParams(k=4, device="cpu"))
    return out / "near_duplicates.parquet"


def export_tables(tables_dir, params, *, parallel=False, cluster=None, relative_roots=False):
    """Pairs, then the export stage, on the ``tables`` fixture; returns (stats, every exported row).

    Runs in this process unless ``parallel`` (worker processes cost seconds to start) or
    ``cluster`` (flows.config.params.ClusterParams). ``relative_roots``: the source roots are given
    relative to ``tables_dir``, which must then be the working folder.
    """
    import dataclasses

    from flows.config.params import PairsParams, SourcesParams
    from flows.export.shards import export_shards
    from flows.pairs.stage import build_pairs
    from flows.schemas import EXPORT
    from flows.splits import grouped_rule
    from flows.tables import iter_rows

    params = params if parallel else dataclasses.replace(params, workers=1)
    write_images(tables_dir, tables_dir / "mv")
    write_images(tables_dir, tables_dir / "oi")
    rule, _ = grouped_rule(params, near_duplicates_of(tables_dir), tables_dir / "frames.parquet")
    build_pairs(tables_dir / "frames.parquet", tables_dir / "masks.parquet", tables_dir / "embeddings.parquet",
                tables_dir, PairsParams(min_angle_deg=60.0), rule)
    roots = ("mv", "oi") if relative_roots else (str(tables_dir / "mv"), str(tables_dir / "oi"))
    sources = SourcesParams(mvimgnet_root=roots[0], openimages_root=roots[1])
    stats = export_shards(frames=tables_dir / "frames.parquet", masks=tables_dir / "masks.parquet",
                          embeddings=tables_dir / "embeddings.parquet", pairs=tables_dir / "pairs.parquet",
                          pair_rejects=tables_dir / "rejects.parquet", sources=sources, out_dir=tables_dir / "export",
                          params=params, cluster=cluster, near_duplicates=near_duplicates_of(tables_dir))
    rows = [r for split in ("train", "heldout") for p in sorted((tables_dir / "export" / split).glob("*.parquet"))
            for r in iter_rows(p, EXPORT)]
    return stats, rows

"""The report's examples and histograms, read in Arrow a batch at a time, against the former
row-by-row code (kept here literally) on tables of many row groups and batches."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.report import build
from flows.report.build import (
    ANGLE_BINS,
    AREA_BINS,
    SIMILARITY_BINS,
    ReportInputs,
    _pick,
)
from flows.schemas import FRAMES, MASKS, NEIGHBOURS, PAIRS
from flows.tables import iter_batches, iter_rows

ROW_GROUP = 70  # rows per row group of the test tables
BATCH = 32  # rows per batch read by the report (patched): several batches per row group, a short last one


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(build, "ROW_GROUP_ROWS", BATCH)
    monkeypatch.setattr(build, "DISTINCT_SLACK", 5)  # the distinct subject ids are deduplicated many times


def _write(path, schema, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=ROW_GROUP)
    return path


# --- the former code, literally ------------------------------------------------------------------

def old_chosen_pairs(path, n_pairs):
    pairs = [p for p in iter_rows(path, PAIRS, columns=[
        "frame_id", "kind", "positive_frame_id", "angle_deg", "r_ij", "aug_crop", "aug_scale", "aug_flip",
        "aug_background", "aug_seed"])]
    shown = _pick([p for p in pairs if p["kind"] == "multiview"], n_pairs // 2 or 1)
    shown += _pick([p for p in pairs if p["kind"] == "augmentation"], n_pairs - len(shown))
    return shown


def old_chosen_subjects(path, n_subjects, n_neighbours):
    neighbours = {}
    for row in iter_rows(path, NEIGHBOURS):
        if row["level"] == "subject" and row["rank"] < n_neighbours:
            neighbours.setdefault(row["i"], []).append(row)
    subjects = _pick(sorted(neighbours), n_subjects)
    return subjects, {s: neighbours[s] for s in subjects}


def old_histogram(path, schema, column, bins, where=None):
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    columns = [column] + ([where[0]] if where else [])
    for batch in iter_batches(path, schema, columns=columns):
        values = batch.column(column).to_numpy(zero_copy_only=False)
        if where:
            values = values[np.asarray(batch.column(where[0]).to_pylist()) == where[1]]
        values = values[~np.isnan(values.astype(np.float64))]
        counts += np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)[0]
    return counts


def old_frame_lookup(inputs, wanted):
    found = {}
    for batch in iter_batches(inputs.frames, FRAMES, columns=["frame_id", "source", "image_path"]):
        for row in batch.to_pylist():
            if row["frame_id"] in wanted:
                found[row["frame_id"]] = row
    for row in iter_rows(inputs.masks, MASKS, columns=["frame_id", "rle_counts", "width", "height"]):
        if row["frame_id"] in found:
            found[row["frame_id"]].update(rle=row["rle_counts"], size=(row["width"], row["height"]))
    return found


def old_representatives(masks, subjects):
    first = {}
    for batch in iter_batches(masks, MASKS, columns=["frame_id", "subject_id"]):
        for fid, subject in zip(batch.column("frame_id").to_pylist(), batch.column("subject_id").to_pylist()):
            if subject in subjects and subject not in first:
                first[subject] = fid
    return first


# --- tables ---------------------------------------------------------------------------------------

def _pairs(rng, n, p_multiview=0.6):
    rows = []
    for k in range(n):
        multi = rng.uniform() < p_multiview if k % 50 < 40 else k % 2 == 0  # runs and alternation
        rows.append({"pair_id": f"p{k}", "source": "mvimgnet" if multi else "openimages", "subject_id": f"s{k // 7}",
                     "frame_id": f"f{k}", "kind": "multiview" if multi else "augmentation",
                     "positive_frame_id": f"g{k}" if multi else None,
                     "angle_deg": (None if k % 11 == 0 else float(rng.uniform(0, 180))) if multi else None,
                     "frame_gap": int(rng.integers(1, 30)) if multi else None, "area_ratio": float(rng.uniform(0.5, 2)),
                     "r_ij": float(rng.uniform(-1, 1)),
                     "aug_crop": None if multi else [float(v) for v in rng.uniform(0, 1, 4)],
                     "aug_scale": None if multi else float(rng.uniform(0.7, 1.3)),
                     "aug_flip": None if multi else bool(rng.integers(2)),
                     "aug_background": None if multi or k % 3 else f"train/{k}.jpg",
                     "aug_seed": None if multi else int(rng.integers(1 << 62))})
    return rows


def _neighbours(rng, n_subjects=57, k=8, layout="mixed"):
    # subject ids whose byte order and code-point order must agree with Python's sorted()
    names = [f"{prefix}{n:03d}" for n, prefix in zip(range(n_subjects), ["mvimgnet:", "openimages:", "Z", "é", "ä", "z"] * 20)]
    rows = []
    for name in names:
        for rank in range(k):
            rows.append({"level": "frame", "i": f"{name}/000.jpg", "j": f"x{rank}", "rank": rank,
                         "r": float(rng.uniform(-1, 1)), "near_duplicate": False})
        if name.endswith("7"):
            ranks = range(6, k)  # only ranks past a small n_neighbours: not a candidate for n_neighbours <= 6
        else:
            ranks = range(k)
        for rank in ranks:
            rows.append({"level": "subject", "i": name, "j": names[(names.index(name) + rank + 1) % len(names)],
                         "rank": rank, "r": float(np.float32(rng.uniform(-1.0, 1.0003))), "near_duplicate": False})
    if layout == "as written":  # as the similarity stage writes it: the frame level, then the subject level
        return [r for r in rows if r["level"] == "frame"] + [r for r in rows if r["level"] == "subject"]
    order, half = rng.permutation(len(rows)), len(rows) // 2
    # half of the rows shuffled (a subject's rows spread out, levels mixed), half in order
    return [rows[i] for i in order[:half]] + [rows[i] for i in sorted(order[half:])]


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_pairs", [1, 2, 3, 8, 9, 400, 5000])
def test_chosen_pairs_match_the_row_by_row_code(tmp_path, n_pairs):
    rng = np.random.default_rng(n_pairs)
    for name, rows in (("mixed", _pairs(rng, 1500)), ("multiview only", _pairs(rng, 300, 1.0)[:37]),
                       ("augmentation only", [r for r in _pairs(rng, 400, 0.0) if r["kind"] == "augmentation"]),
                       ("empty", [])):
        path = _write(tmp_path / "pairs.parquet", PAIRS, rows)
        assert build._chosen_pairs(path, n_pairs) == old_chosen_pairs(path, n_pairs), name


@pytest.mark.parametrize("layout", ["mixed", "as written"])
@pytest.mark.parametrize("n_subjects,n_neighbours", [(1, 1), (4, 5), (4, 7), (13, 3), (200, 8), (3, 100)])
def test_chosen_subjects_match_the_row_by_row_code(tmp_path, n_subjects, n_neighbours, layout):
    rows = _neighbours(np.random.default_rng(n_subjects), layout=layout)
    path = _write(tmp_path / "neighbours.parquet", NEIGHBOURS, rows)
    subjects, neighbours = build._chosen_subjects(path, n_subjects, n_neighbours)
    old_subjects, old_neighbours = old_chosen_subjects(path, n_subjects, n_neighbours)
    assert subjects == old_subjects and neighbours == old_neighbours
    assert all(neighbours[s] for s in subjects)


def test_row_groups_that_statistics_rule_out_are_skipped(tmp_path):
    path = _write(tmp_path / "neighbours.parquet", NEIGHBOURS, _neighbours(np.random.default_rng(0), layout="as written"))
    meta = pq.ParquetFile(path).metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    frame_only = [g for g in groups if g.column(0).statistics.max == "frame"]
    assert frame_only and all(build._ruled_out(g, [("level", "=", "subject")]) for g in frame_only)
    assert not any(build._ruled_out(g, [("level", "=", "subject")]) for g in groups if g not in frame_only)
    assert all(build._ruled_out(g, [("rank", "<", 0)]) for g in groups)
    assert not any(build._ruled_out(g, [("rank", "<", 1)]) for g in groups)
    assert all(build._ruled_out(g, [("i", "in", {"\U0010ffff: past every id"})]) for g in groups)


def test_chosen_subjects_of_a_table_without_subject_rows(tmp_path):
    rows = [r for r in _neighbours(np.random.default_rng(0)) if r["level"] == "frame"]
    path = _write(tmp_path / "neighbours.parquet", NEIGHBOURS, rows)
    assert build._chosen_subjects(path, 4, 5) == ([], {}) == old_chosen_subjects(path, 4, 5)


def test_histograms_match_the_row_by_row_code(tmp_path):
    rng = np.random.default_rng(2)
    neighbours = _write(tmp_path / "neighbours.parquet", NEIGHBOURS, _neighbours(rng))
    pairs = _write(tmp_path / "pairs.parquet", PAIRS, _pairs(rng, 1000))
    for args in ((neighbours, NEIGHBOURS, "r", SIMILARITY_BINS, ("level", "subject")),
                 (neighbours, NEIGHBOURS, "r", SIMILARITY_BINS, ("level", "frame")),
                 (neighbours, NEIGHBOURS, "r", SIMILARITY_BINS, ("level", "nothing")),
                 (neighbours, NEIGHBOURS, "r", SIMILARITY_BINS),
                 (pairs, PAIRS, "angle_deg", ANGLE_BINS),  # nulls left out
                 (pairs, PAIRS, "area_ratio", AREA_BINS)):
        assert build._histogram(*args).tolist() == old_histogram(*args).tolist()


def test_frame_lookup_and_representatives_match_the_row_by_row_code(tables):
    for name, schema in (("frames", FRAMES), ("masks", MASKS)):  # rewrite in row groups of 5 rows
        table = pq.read_table(tables / f"{name}.parquet")
        pq.write_table(table, tables / f"{name}.parquet", row_group_size=5)
    inputs = ReportInputs(tables / "frames.parquet", tables / "masks.parquet", tables / "pairs.parquet",
                          tables / "neighbours.parquet", {})
    wanted = {"mvimgnet:1/aaaaaaaa/003.jpg", "mvimgnet:1/aaaaaaaa/005.jpg", "mvimgnet:1/bbbbbbbb/007.jpg",
              "openimages:0002/k", "not a frame"}
    assert build._frame_lookup(inputs, wanted) == old_frame_lookup(inputs, wanted)
    assert build._frame_lookup(inputs, set()) == {}
    subjects = {"mvimgnet:1/bbbbbbbb", "openimages:0001/k", "not a subject"}
    assert build._representatives(inputs.masks, subjects) == old_representatives(inputs.masks, subjects)

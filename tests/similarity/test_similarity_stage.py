import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config.params import SimilarityParams
from flows.schemas import HARD_NEGATIVES, NEAR_DUPLICATES, NEIGHBOURS, embeddings_schema
from flows.similarity import stage
from flows.similarity.stage import compute_similarity
from flows.tables import iter_rows, write_table

ROOT = Path(__file__).resolve().parents[2]


def test_stage_tables(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 40, 16
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    vectors[1] = vectors[0] + 1e-3  # subject s0 and s1 hold the same image: near-duplicates
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    subjects = [f"s{i // 2}" if i >= 2 else f"s{i}" for i in range(n)]  # s0, s1, then two frames per subject
    write_table(tmp_path / "emb.parquet", embeddings_schema(d),
                [{"frame_id": f"f{i}", "subject_id": s, "embedding": v.astype(np.float16).tolist(), "model_id": "m"}
                 for i, (s, v) in enumerate(zip(subjects, vectors))])
    params = SimilarityParams(k=5, near_duplicate_r=0.99, hard_negatives=3, device="cpu")
    stats = compute_similarity(tmp_path / "emb.parquet", tmp_path / "out", params)
    neighbours = list(iter_rows(tmp_path / "out" / "neighbours.parquet", NEIGHBOURS))
    frames = [r for r in neighbours if r["level"] == "frame"]
    assert len(frames) == n * 5 and stats["frame_neighbour_rows"] == n * 5
    first = [r for r in frames if r["i"] == "f0"]
    assert [r["rank"] for r in first] == list(range(5)) and first[0]["j"] == "f1" and first[0]["near_duplicate"]
    brute = vectors.astype(np.float16).astype(np.float32) @ vectors.astype(np.float16).astype(np.float32)[0]
    assert abs(first[0]["r"] - brute[1]) < 1e-3
    assert all(r["r"] >= s["r"] for r, s in zip(first, first[1:]))
    dups = list(iter_rows(tmp_path / "out" / "near_duplicates.parquet", NEAR_DUPLICATES))
    assert [(r["subject_a"], r["subject_b"]) for r in dups] == [("s0", "s1")]
    negatives = list(iter_rows(tmp_path / "out" / "hard_negatives.parquet", HARD_NEGATIVES))
    assert all({r["subject_id"], r["negative_subject_id"]} != {"s0", "s1"} for r in negatives)
    assert stats["subjects"] == len(set(subjects))
    assert max(r["rank"] for r in negatives) == 2


def test_near_duplicate_pairs_name_the_smaller_id_first(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(4, 8)).astype(np.float32)
    vectors[1] = vectors[0]  # "zz" (seen first) and "aa" are duplicates
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_table(tmp_path / "emb.parquet", embeddings_schema(8),
                [{"frame_id": f"f{i}", "subject_id": s, "embedding": v.astype(np.float16).tolist(), "model_id": "m"}
                 for i, (s, v) in enumerate(zip(["zz", "aa", "mm", "bb"], vectors))])
    compute_similarity(tmp_path / "emb.parquet", tmp_path / "out",
                       SimilarityParams(k=3, near_duplicate_r=0.99, hard_negatives=2, device="cpu"))
    dups = list(iter_rows(tmp_path / "out" / "near_duplicates.parquet", NEAR_DUPLICATES))
    assert [(r["subject_a"], r["subject_b"]) for r in dups] == [("aa", "zz")]


def test_a_near_duplicate_frame_is_found_behind_the_subjects_own_views(tmp_path):
    # Two objects, 6 views each: views 0-3 of each are a tight cluster (adjacent video frames,
    # r ~ 0.9999), the two clusters are near-duplicates of each other (r ~ 0.97), views 4-5
    # point elsewhere, so the subject means are not (r ~ 0.85). With k = 3 every frame's top 3
    # are its own cluster: only a deeper search sees the other object.
    rng = np.random.default_rng(5)
    p = rng.normal(size=32)
    q = p + 0.25 * np.linalg.norm(p) / np.sqrt(32) * rng.normal(size=32)
    vectors = []
    for centre in (p, q):
        vectors += [centre + 0.005 * np.linalg.norm(p) / np.sqrt(32) * rng.normal(size=32) for _ in range(4)]
        vectors += [rng.normal(size=32) for _ in range(2)]
    vectors = np.array(vectors, np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    subjects = ["a"] * 6 + ["b"] * 6
    write_table(tmp_path / "emb.parquet", embeddings_schema(32),
                [{"frame_id": f"f{i}", "subject_id": s, "embedding": v.astype(np.float16).tolist(), "model_id": "m"}
                 for i, (s, v) in enumerate(zip(subjects, vectors))])
    gram = vectors @ vectors.T
    assert gram[0, 1:4].min() > gram[0, 6] > 0.95  # own cluster first, then the duplicate
    mean_a, mean_b = vectors[:6].mean(0), vectors[6:].mean(0)
    assert mean_a @ mean_b / np.linalg.norm(mean_a) / np.linalg.norm(mean_b) < 0.95  # not at subject level

    def near_duplicates(params, out):
        stats = compute_similarity(tmp_path / "emb.parquet", tmp_path / out, params)
        rows = iter_rows(tmp_path / out / "near_duplicates.parquet", NEAR_DUPLICATES)
        return stats, [(d["subject_a"], d["subject_b"]) for d in rows]

    params = SimilarityParams(k=3, near_duplicate_r=0.95, hard_negatives=2, device="cpu")
    stats, dups = near_duplicates(params, "out")
    assert dups == [("a", "b")]
    assert stats["frame_search_k"] == 3 + 5 and stats["rows_searched_past_k"]["frames"] == 0
    frames = [n for n in iter_rows(tmp_path / "out" / "neighbours.parquet", NEIGHBOURS) if n["level"] == "frame"]
    assert len(frames) == len(subjects) * 3  # the table keeps the plain top-k
    # without the deeper search the top 3 are the own cluster, still >= 0.95: those rows are
    # searched past k by threshold, and the pair is found all the same
    stats, dups = near_duplicates(dataclasses.replace(params, near_duplicate_extra_k=0), "out2")
    assert dups == [("a", "b")] and stats["frame_search_k"] == 3 and stats["rows_searched_past_k"]["frames"] == 8


def _cluster_embeddings(path, clusters: list[int], *, d: int = 32, spread: float = 0.004, seed: int = 0):
    """One frame per subject; subjects in clusters of the given sizes around random centres, then noise rows."""
    rng = np.random.default_rng(seed)
    vectors, names = [], []
    for c, size in enumerate(clusters):
        centre = rng.normal(size=d)
        centre /= np.linalg.norm(centre)
        for m in range(size):
            vectors.append(centre + spread * rng.normal(size=d))
            names.append(f"c{c}-{m:03d}")
    for m in range(40):
        vectors.append(rng.normal(size=d))
        names.append(f"noise-{m:03d}")
    vectors = np.array(vectors, np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors.astype(np.float16)
    write_table(path, embeddings_schema(d), [{"frame_id": n, "subject_id": n, "embedding": v.tolist(), "model_id": "m"}
                                            for n, v in zip(names, vectors)])
    return names, vectors.astype(np.float32)


@pytest.mark.parametrize("k", [4, 16])
def test_near_duplicates_of_clusters_larger_than_k_are_all_found(tmp_path, k):
    # 20 and 30 look-alike subjects: each row's top k is full of its cluster, and the pairs past
    # the k-th are found by the threshold search; the table equals brute force
    names, vectors = _cluster_embeddings(tmp_path / "emb.parquet", [20, 30, 3])
    threshold = 0.99
    gram = vectors @ vectors.T
    expected = {tuple(sorted((names[a], names[b]))) for a, b in zip(*np.nonzero(gram >= threshold)) if a != b}
    params = SimilarityParams(k=k, near_duplicate_r=threshold, hard_negatives=2, device="cpu")
    stats = compute_similarity(tmp_path / "emb.parquet", tmp_path / "out", params)
    found = {(d["subject_a"], d["subject_b"]) for d in iter_rows(tmp_path / "out" / "near_duplicates.parquet",
                                                                NEAR_DUPLICATES)}
    assert len(expected) > 400 and found == expected  # C(20,2) + C(30,2) + C(3,2) = 628 at this spread
    assert stats["rows_searched_past_k"]["subjects"] >= 50 - 2 * k


def test_read_embeddings_fills_one_array_across_row_groups_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "READ_BATCH_ROWS", 3)  # batches inside and across the row groups of 4
    rng = np.random.default_rng(7)
    rows = [{"frame_id": f"f{i}", "subject_id": f"s{i % 3}", "model_id": "m",
             "embedding": rng.standard_normal(8).astype(np.float16).tolist()} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows, schema=embeddings_schema(8)), tmp_path / "emb.parquet", row_group_size=4)
    frame_ids, subjects, vectors = stage.read_embeddings(tmp_path / "emb.parquet")
    assert frame_ids.to_pylist() == [r["frame_id"] for r in rows] and subjects.to_pylist() == [r["subject_id"] for r in rows]
    assert vectors.dtype == np.float16 and vectors.flags.c_contiguous
    np.testing.assert_array_equal(vectors, np.array([r["embedding"] for r in rows], np.float16))


READ_MEMORY_PROBE = r"""
import json, re, sys
from pathlib import Path
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from flows.schemas import embeddings_schema

n, d, path = 50_000, 256, Path(sys.argv[1])
with pq.ParquetWriter(path, embeddings_schema(d), compression="zstd") as writer:
    rng = np.random.default_rng(0)
    for r0 in range(0, n, 8192):
        rows = min(8192, n - r0)
        x = rng.standard_normal((rows, d), dtype=np.float32)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        writer.write_table(pa.table({
            "frame_id": [f"frame-{i:09d}" for i in range(r0, r0 + rows)],
            "subject_id": [f"subject-{i // 30:07d}" for i in range(r0, r0 + rows)],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d),
            "model_id": ["m"] * rows}, schema=embeddings_schema(d)))
from flows.similarity.stage import read_embeddings
from flows.similarity.subjects import encode_subjects, subject_means
status = lambda key: int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM: the peak from here on
base = status("VmRSS")
frame_ids, frame_subjects, vectors = read_embeddings(path)
subjects, codes = encode_subjects(frame_subjects)
means, counts = subject_means(vectors, codes, subjects)
print(json.dumps({"extra_bytes": status("VmHWM") - base, "vectors_bytes": vectors.nbytes, "subjects": len(subjects)}))
"""


def test_reading_and_subject_means_hold_little_beyond_the_float16_embeddings(tmp_path):
    """50k x 256 float16 (25.6 MB): the float32 copy, float64 sums and sorted copies of the
    first version took 14x that (358 MB); now the array itself plus bounded temporaries
    (69-100 MB measured, allocator pools included)."""
    out = subprocess.run([sys.executable, "-c", READ_MEMORY_PROBE, str(tmp_path / "emb.parquet")], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["subjects"] == 1667
    assert probe["extra_bytes"] < 6 * probe["vectors_bytes"], probe


def write_random_embeddings(path, n=60, d=16, seed=11):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    vectors[1] = vectors[0] + 1e-3  # a near-duplicate pair of subjects
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_table(path, embeddings_schema(d),
                [{"frame_id": f"f{i}", "subject_id": f"s{(i * 7) % 23}", "model_id": "m",
                  "embedding": v.astype(np.float16).tolist()} for i, v in enumerate(vectors)])


def test_tables_written_in_blocks_are_the_same_tables(tmp_path, monkeypatch):
    write_random_embeddings(tmp_path / "emb.parquet")
    params = SimilarityParams(k=4, near_duplicate_r=0.99, hard_negatives=2, device="cpu")
    compute_similarity(tmp_path / "emb.parquet", tmp_path / "whole", params)
    monkeypatch.setattr(stage, "WRITE_ROWS", 7)  # blocks cut inside a row's neighbours, and at its end
    compute_similarity(tmp_path / "emb.parquet", tmp_path / "blocks", params)
    for name in ("neighbours", "near_duplicates", "hard_negatives"):
        whole, blocks = (pq.read_table(tmp_path / out / f"{name}.parquet") for out in ("whole", "blocks"))
        assert whole.num_rows and blocks.equals(whole), name
    assert pq.ParquetFile(tmp_path / "blocks" / "neighbours.parquet").metadata.num_row_groups > 1


def test_write_rows_is_pyarrows_default_row_group_size(tmp_path):
    """Writing in blocks of WRITE_ROWS gives the row groups (and bytes) of one write only while
    pyarrow cuts row groups at WRITE_ROWS by default."""
    pq.write_table(pa.table({"x": np.zeros(stage.WRITE_ROWS + 1, np.int8)}), tmp_path / "t.parquet")
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [stage.WRITE_ROWS, 1]


def test_a_run_that_stops_midway_leaves_no_stats(tmp_path, monkeypatch):
    write_random_embeddings(tmp_path / "emb.parquet")
    params = SimilarityParams(k=4, near_duplicate_r=0.99, hard_negatives=2, device="cpu")
    compute_similarity(tmp_path / "emb.parquet", tmp_path / "out", params)
    assert (tmp_path / "out" / "stats.json").exists()
    write_blocks, calls = stage._write_blocks, []

    def crash_at_the_third_table(writer, rows, block):
        calls.append(writer.path.name)
        if writer.path.name == "hard_negatives.parquet":
            raise RuntimeError("killed")
        write_blocks(writer, rows, block)

    monkeypatch.setattr(stage, "_write_blocks", crash_at_the_third_table)
    with pytest.raises(RuntimeError, match="killed"):
        compute_similarity(tmp_path / "emb.parquet", tmp_path / "out", params)
    assert calls[-1] == "hard_negatives.parquet" and "neighbours.parquet" in calls  # new tables were written
    assert not (tmp_path / "out" / "stats.json").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # no temporary files either
        "hard_negatives.parquet", "near_duplicates.parquet", "neighbours.parquet", "timing.json"]  # the first run's


def test_stats_name_the_device_used_and_hold_no_clock(tmp_path, caplog):
    import json
    import logging

    write_random_embeddings(tmp_path / "emb.parquet")
    with caplog.at_level(logging.INFO, logger="flows.similarity"):
        stats = compute_similarity(tmp_path / "emb.parquet", tmp_path / "out",
                                   SimilarityParams(k=4, hard_negatives=2, device="auto"))
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    from flows.similarity.topk import resolve_device

    assert written["device"] == resolve_device("auto") != "auto" and "seconds" not in written
    assert set(json.loads((tmp_path / "out" / "timing.json").read_text())) == {"seconds"} and stats["seconds"] >= 0
    assert any(r.getMessage().startswith("similarity: ") and " in " in r.getMessage() for r in caplog.records)

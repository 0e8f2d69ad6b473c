import numpy as np

from flows.config.params import SimilarityParams
from flows.schemas import HARD_NEGATIVES, NEAR_DUPLICATES, NEIGHBOURS, embeddings_schema
from flows.similarity.stage import compute_similarity
from flows.tables import iter_rows, write_table


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

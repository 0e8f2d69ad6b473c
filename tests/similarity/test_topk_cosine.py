"""topk_cosine against a brute-force numpy reference, its edge cases, and its memory bound."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.similarity import topk
from flows.similarity.topk import topk_cosine, topk_cosine_torch

ROOT = Path(__file__).resolve().parents[2]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def unit_rows(n: int, d: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def brute_force(x: np.ndarray, k: int, exclude_self: bool = True):
    """Every score in float64, an exact partition per row: (indices, values) ordered by value then index."""
    xd = x.astype(np.float64)
    idx, val = [], []
    for r0 in range(0, len(x), 2000):
        scores = xd[r0:r0 + 2000] @ xd.T  # (B, N)
        if exclude_self:
            scores[np.arange(len(scores)), np.arange(r0, r0 + len(scores))] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(x) else np.argsort(-scores, axis=1)
        top_val = np.take_along_axis(scores, top, 1)
        order = np.lexsort((top, -top_val), axis=-1)[:, :k]
        idx.append(np.take_along_axis(top, order, 1))
        val.append(np.take_along_axis(top_val, order, 1))
    return np.concatenate(idx), np.concatenate(val)


def assert_same_topk(x, idx, val, ref_idx, ref_val, tol=1e-3):
    """Same neighbours up to ties: each row's neighbours are distinct, not itself, score what
    is reported, and their sorted exact scores equal the reference's within tol."""
    assert idx.shape == ref_idx.shape and idx.dtype == np.int64 and val.dtype == np.float32
    exact = np.einsum("nd,nkd->nk", x.astype(np.float64), x[idx].astype(np.float64))
    np.testing.assert_allclose(val, exact, atol=tol)
    np.testing.assert_allclose(np.sort(exact, axis=1), np.sort(ref_val, axis=1), atol=tol)
    assert (np.diff(val, axis=1) <= 0).all()  # ordered by value
    assert (np.sort(idx, axis=1)[:, 1:] != np.sort(idx, axis=1)[:, :-1]).all()
    return (np.sort(idx, axis=1) == np.sort(ref_idx, axis=1)).all(axis=1).mean()


@pytest.fixture(scope="module")
def random_10k():
    x = unit_rows(10_000, 64)
    return x, *brute_force(x, 16)


def test_faiss_engine_equals_brute_force_on_10k(random_10k):
    x, ref_idx, ref_val = random_10k
    idx, val = topk_cosine(x, k=16, device="cpu", block_rows=3000)
    assert assert_same_topk(x, idx, val, ref_idx, ref_val) == 1.0  # continuous data: no ties


def test_torch_engine_equals_brute_force_on_10k(random_10k):
    x, ref_idx, ref_val = random_10k
    idx, val = topk_cosine_torch(torch.from_numpy(x), k=16, block_rows=1024, group_sizes=(8, 8, 8))
    assert assert_same_topk(x, idx.numpy(), val.numpy(), ref_idx, ref_val) == 1.0


def test_torch_engine_half_scores_rescored_exactly():
    x = unit_rows(2000, 48, seed=1)
    ref_idx, ref_val = brute_force(x, 8)
    idx, val = topk_cosine_torch(torch.from_numpy(x), k=8, group_sizes=(16, 4), score_dtype=torch.float16)
    assert assert_same_topk(x, idx.numpy(), val.numpy(), ref_idx, ref_val) > 0.99
    np.testing.assert_allclose(val.numpy(), ref_val, atol=1e-5)  # fp32 rescoring, not fp16 values


@pytest.mark.parametrize("n, group_sizes, block_rows", [
    (1000, (4, 4, 4), 333),  # three levels: 1000 -> 250 -> 63 -> 16 maxima
    (997, (7, 3), 100),  # padding at both levels
    (1000, (64, 64), 1000),  # the second level would leave <= c groups: one level only
    (50, (64,), 64),  # too few columns for any level: plain topk
    (40, (), 7),
])
def test_torch_engine_levels_blocks_and_padding(n, group_sizes, block_rows):
    x = unit_rows(n, 24, seed=n)
    ref_idx, ref_val = brute_force(x, 10)
    idx, val = topk_cosine_torch(torch.from_numpy(x), k=10, block_rows=block_rows, group_sizes=group_sizes)
    assert assert_same_topk(x, idx.numpy(), val.numpy(), ref_idx, ref_val) == 1.0


@pytest.mark.parametrize("cluster", [np.arange(100, 356, 16), 100 + 256 * np.arange(16)],
                         ids=["one-per-group", "all-in-one-group"])
def test_group_max_select_finds_clustered_neighbours(cluster):
    """Row 0's 16 nearest rows spread over 16 groups, or packed into one (groups are strided:
    with 4096 columns and g = 16, group p holds columns p, p + 256, ...): the select finds all."""
    x = unit_rows(4096, 16, seed=6)
    x[cluster] = x[0] + 0.03 * unit_rows(16, 16, seed=7)  # cosines ~0.9996, apart by >> float32 rounding
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref_idx, ref_val = brute_force(x, 20)
    idx, val = topk_cosine_torch(torch.from_numpy(x), k=20, group_sizes=(16, 16))
    assert set(cluster.tolist()) <= set(idx[0].tolist())
    assert assert_same_topk(x, idx.numpy(), val.numpy(), ref_idx, ref_val) > 0.999  # d = 16: a few exact ties


def test_float16_input_and_row_range_match_the_full_answer():
    x = unit_rows(3000, 32, seed=2, dtype=np.float16)
    full_idx, full_val = topk_cosine(x, k=12, device="cpu")
    part_idx, part_val = topk_cosine(x, k=12, device="cpu", row_range=(1000, 1700), block_rows=256)
    np.testing.assert_array_equal(part_idx, full_idx[1000:1700])
    np.testing.assert_array_equal(part_val, full_val[1000:1700])
    ref_idx, ref_val = brute_force(x.astype(np.float32), 12)
    assert_same_topk(x.astype(np.float32), full_idx, full_val, ref_idx, ref_val)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
@pytest.mark.parametrize("n, k, exclude_self, width", [
    (0, 5, True, 0), (1, 5, True, 0), (1, 5, False, 1), (4, 10, True, 3), (4, 10, False, 4), (6, 5, True, 5),
])
def test_small_inputs_give_fewer_columns(engine, n, k, exclude_self, width):
    x = unit_rows(n, 8, seed=3)
    idx, val = run_engine(engine, x, k=k, exclude_self=exclude_self)
    assert idx.shape == val.shape == (n, width)
    if n and width:
        ref_idx, ref_val = brute_force(x, width, exclude_self)
        assert_same_topk(x, idx, val, ref_idx, ref_val)
        assert exclude_self == (idx != np.arange(n)[:, None]).all()


@pytest.mark.parametrize("engine", ["faiss", "torch"])
def test_duplicates_drop_self_by_index_and_order_ties_by_index(engine):
    base = unit_rows(3, 16, seed=4)
    x = base[[0, 1, 0, 0, 2, 0, 0, 0]]  # row 0 has five exact copies: 2, 3, 5, 6, 7
    idx, val = run_engine(engine, x, k=4)
    assert (idx != np.arange(8)[:, None]).all()
    np.testing.assert_allclose(val[0], 1.0, atol=1e-6)
    assert set(idx[0]) <= {2, 3, 5, 6, 7} and list(idx[0]) == sorted(idx[0])


def run_engine(engine, x, **kwargs):
    if engine == "faiss":
        return topk_cosine(x, device="cpu", **kwargs)
    idx, val = topk_cosine_torch(torch.from_numpy(x), **kwargs)
    return idx.numpy(), val.numpy()


@pytest.mark.parametrize("bad, message", [
    (np.ones((3, 4), np.float32), "norm 2"),
    (np.full((2, 4), np.nan, np.float32), "norm nan"),
    (np.zeros((2, 4), np.float32), "norm 0"),
    (unit_rows(3, 4).astype(np.float64), "float16 or float32"),
    (unit_rows(3, 4)[0], "2-D"),
])
def test_rejects_rows_that_are_not_unit_vectors(bad, message):
    with pytest.raises(ValueError, match=message):
        topk_cosine(bad, k=2, device="cpu")


@pytest.mark.parametrize("on", ["numpy", "torch"])
@pytest.mark.parametrize("value, message", [(2.0, "row 5 has norm 2"), (np.nan, "row 5 has norm nan")])
def test_the_norm_check_names_the_first_bad_row_past_the_first_chunk(monkeypatch, on, value, message):
    """The faiss path checks in numpy; the cuda path checks on the device after the upload (the same rule
    and message; run here on CPU tensors). Chunks of 2 rows: row 5 is in the third."""
    from flows.similarity import topk

    monkeypatch.setattr(topk, "NORM_CHECK_ROWS", 2)
    x = unit_rows(8, 4).astype(np.float16)
    x[5] *= value
    x[7] *= 3
    check = topk._check_norms if on == "numpy" else (lambda a: topk._check_norms_torch(torch.from_numpy(a)))
    with pytest.raises(ValueError, match=message):
        check(x)
    check(unit_rows(8, 4).astype(np.float16))  # fp16 rounding is within the tolerance


@pytest.mark.parametrize("bad, kwargs", [
    (np.full((1, 4), np.nan, np.float32), {}),  # one row: nothing to search, k' = 0
    (np.ones((3, 4), np.float32), {"row_range": (1, 1)}),  # an empty shard of the rows
])
def test_bad_rows_fail_even_where_there_is_nothing_to_search(bad, kwargs):
    with pytest.raises(ValueError, match="has norm"):
        topk_cosine(bad, k=2, device="cpu", **kwargs)


def test_rejects_bad_arguments():
    x = unit_rows(5, 4)
    with pytest.raises(ValueError, match="k must be"):
        topk_cosine(x, k=0, device="cpu")
    with pytest.raises(ValueError, match="row_range"):
        topk_cosine(x, k=2, device="cpu", row_range=(3, 9))
    with pytest.raises(ValueError, match="device"):
        topk_cosine(x, k=2, device="tpu")


def test_explicit_block_rows_is_an_upper_limit_under_the_budget(monkeypatch):
    """params.yaml's block_rows = 4096 at N = 6.5M would be a 53 GB fp16 score buffer: the
    budget caps it. Counted at the GEMM: block sizes, and the keys are x itself (no copy)."""
    x = torch.from_numpy(unit_rows(3000, 32, seed=8))
    ref_idx, ref_val = topk_cosine_torch(x, k=10, block_rows=4096)  # the default budget holds all 3000 rows
    budget = 300 * 3008 * 4  # ~300 rows of float32 scores (n_pad = 3008 for groups of 64)
    monkeypatch.setitem(topk.TORCH_BUFFER_BYTES, "cpu", budget)
    blocks, mm = [], torch.mm

    def counting_mm(a, b, **kwargs):
        blocks.append((a.shape[0], kwargs["out"].shape, b.data_ptr() == x.data_ptr()))
        return mm(a, b, **kwargs)

    monkeypatch.setattr(torch, "mm", counting_mm)
    idx, val = topk_cosine_torch(x, k=10, block_rows=4096)
    assert len(blocks) > 10 and sum(rows for rows, _, _ in blocks) == 3000
    assert all(rows * 3008 * 4 <= budget and out == (rows, 3000) and same for rows, out, same in blocks)
    assert torch.equal(idx, ref_idx) and torch.equal(val, ref_val)
    blocks.clear()
    topk_cosine_torch(x, k=10, block_rows=100)  # under the budget: as asked
    assert [rows for rows, _, _ in blocks] == [100] * 30


def test_budget_block_rows():
    assert topk.budget_block_rows(None, 1000, 1_000_000, 5000) == 768  # whole 256-row tiles
    assert topk.budget_block_rows(4096, 1000, 1_000_000, 5000) == 768  # capped
    assert topk.budget_block_rows(333, 1000, 1_000_000, 5000) == 333  # under the cap: as given
    assert topk.budget_block_rows(None, 1000, 100_000, 5000) == 100  # under one tile: as fits
    assert topk.budget_block_rows(None, 10**9, 1000, 5000) == 1  # never zero
    assert topk.budget_block_rows(None, 10, 10**9, 700) == 700  # never more than the rows


def test_triton_engine_block_rows_is_capped_by_the_budget(monkeypatch):
    """The triton engine's (B, N / g) float32 group maxima obey the budget too. The kernels are
    replaced by torch equivalents (the interpreter is slow; test_triton_groupmax checks them)."""
    from flows.similarity import triton_groupmax

    blocks = []

    def group_max_scores(queries, keys, *, group, exclude_offset=None, config=None):
        blocks.append(queries.shape[0])
        scores = queries.float() @ keys.float().T  # (B, N)
        b, n = scores.shape
        if exclude_offset is not None:
            rows = torch.arange(b)
            scores[rows, rows + exclude_offset] = -math.inf
        scores = torch.nn.functional.pad(scores, (0, -n % group), value=-math.inf)
        return scores.view(b, -1, group).amax(dim=2)  # contiguous groups, as the kernel's

    def rescore_groups(queries, keys, groups, *, group, exclude_offset=None, config=None):
        b, c = groups.shape
        cols = (groups[:, :, None] * group + torch.arange(group)).view(b, c * group)
        exact = torch.einsum("bd,bcd->bc", queries.float(), keys[cols.clamp(max=len(keys) - 1)].float())
        invalid = cols >= len(keys)
        if exclude_offset is not None:
            invalid |= cols == torch.arange(b)[:, None] + exclude_offset
        return exact.masked_fill(invalid, -math.inf)

    monkeypatch.setattr(triton_groupmax, "group_max_scores", group_max_scores)
    monkeypatch.setattr(triton_groupmax, "rescore_groups", rescore_groups)
    x = unit_rows(3000, 32, seed=9)
    ref_idx, ref_val = brute_force(x, 10)
    budget = 80 * 188 * 4  # ~80 rows of float32 maxima (3000 columns in groups of 16)
    monkeypatch.setitem(topk.TORCH_BUFFER_BYTES, "cpu", budget)
    idx, val = topk_cosine_torch(torch.from_numpy(x), k=10, engine="triton", block_rows=4096)
    assert len(blocks) > 30 and sum(blocks) == 3000 and max(blocks) * 188 * 4 <= budget
    assert assert_same_topk(x, idx.numpy(), val.numpy(), ref_idx, ref_val) == 1.0


def test_cpu_engine_warns_of_its_cost_above_a_million_rows(monkeypatch, caplog):
    x = unit_rows(300, 8, seed=10)
    monkeypatch.setattr(topk, "CPU_WARN_ROWS", 300)
    with caplog.at_level(logging.WARNING, logger="flows.similarity.topk"):
        topk_cosine(x, k=3, device="cpu")  # N = 300: not above
        assert not caplog.records
        monkeypatch.setattr(topk, "CPU_WARN_ROWS", 299)
        idx, _ = topk_cosine(x, k=3, device="cpu")  # warns, and still answers
    assert idx.shape == (300, 3)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "similarity.device: cuda" in record.getMessage()
    days = topk.cpu_search_seconds(6_500_000, 6_500_000, 1024, threads=2) / 86400
    assert 5 < days < 6  # 83 s for 100k x 768 on 2 threads, scaled by N^2 * d


@CUDA
def test_cuda_engine_equals_brute_force():
    x = unit_rows(20_000, 64, seed=5, dtype=np.float16)
    ref_idx, ref_val = brute_force(x.astype(np.float32), 32)
    idx, val = topk_cosine(x, k=32, device="cuda", block_rows=4096)
    assert assert_same_topk(x.astype(np.float32), idx, val, ref_idx, ref_val) > 0.999


MEMORY_PROBE = r"""
import json, re, sys
import numpy as np
engine, n, d, k, rows = sys.argv[1], 200_000, 32, 8, int(sys.argv[2])
x = np.empty((n, d), np.float32)  # filled in chunks, so the baseline holds no large temporaries
rng = np.random.default_rng(0)
for r0 in range(0, n, 20_000):
    chunk = rng.standard_normal((20_000, d), dtype=np.float32)
    x[r0:r0 + 20_000] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
from flows.similarity.topk import topk_cosine, topk_cosine_torch
import faiss, torch
torch.set_num_threads(2)
status = lambda key: int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) << 10
base = status("VmRSS")
if engine == "faiss":
    idx, _ = topk_cosine(x, k=k, device="cpu", row_range=(0, rows))
else:
    idx, _ = topk_cosine_torch(torch.from_numpy(x), k=k, row_range=(0, rows))
peak = status("VmHWM")  # this process's peak (ru_maxrss would include the parent's, kept across exec)
print(json.dumps({"extra_bytes": peak - base, "shape": list(idx.shape)}))
"""


@pytest.mark.parametrize("engine, rows, limit", [("faiss", 3000, 256 << 20), ("torch", 1500, 1 << 30)])
def test_peak_memory_is_bounded_for_200k_rows(engine, rows, limit):
    """N = 200k keys (N^2 float32 scores would be 160 GB); a slice of the query rows keeps the
    test fast, and the memory of a blockwise pass does not depend on how many rows it answers."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, engine, str(rows)], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=120)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["shape"] == [rows, 8]
    assert probe["extra_bytes"] < limit, probe

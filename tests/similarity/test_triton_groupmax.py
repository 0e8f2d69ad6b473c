"""The triton engine of topk_cosine_torch: its kernels against numpy, and the whole engine
against brute force.

There is no GPU here or in CI, so the kernels run in Triton's interpreter (TRITON_INTERPRET=1,
which must be set before the kernels are defined): one child process computes every case
from inputs this module writes, and the tests compare its outputs with numpy references.
The interpreter costs ~10 ms per program, so the cases use few, large tiles. On a GPU the
last test compares the compiled engine with the torch engine at N = 200k.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.similarity.topk import topk_cosine_torch
from tests.similarity.test_topk_cosine import (
    CUDA,
    assert_same_topk,
    brute_force,
    unit_rows,
)

ROOT = Path(__file__).resolve().parents[2]

# name: (B, N, d, group, exclude_offset or -1, dtype, (block_m, block_n, block_k))
GROUP_MAX_CASES = {
    "fp32-ragged-exclude": (37, 203, 40, 8, 5, "float32", (16, 32, 16)),  # N, d not multiples of the tile
    "fp16-ragged-exclude": (37, 203, 40, 8, 5, "float16", (16, 32, 16)),
    "fp16-group-is-tile": (50, 300, 64, 16, -1, "float16", (32, 16, 32)),
    "fp32-group-above-tile": (20, 150, 24, 64, 100, "float32", (16, 16, 16)),  # block_n raised to 64
    "fp32-group-1": (20, 45, 16, 1, 10, "float32", (16, 16, 16)),  # a lone diagonal column: -inf
}
# name: (B, N, d, group, c, exclude_offset or -1, query dtype, key dtype, rescore_rows)
RESCORE_CASES = {
    "fp32-rows-1": (19, 203, 40, 8, 5, 3, "float32", "float32", 1),
    "fp16-keys-rows-8": (19, 203, 40, 8, 5, 3, "float32", "float16", 8),
    "fp16-no-exclude": (12, 100, 24, 16, 3, -1, "float16", "float16", 4),
}
# name: (N, d, k, score dtype, group_sizes, row_range, block_rows, exclude_self)
TOPK_CASES = {
    "n3000-fp32": (3000, 64, 8, "float32", None, None, None, True),  # margin 0: the strictest
    "n1500-fp16-three-levels-row-range": (1500, 64, 8, "float16", (16, 4, 4), (300, 1000), 256, True),
    "n600-keep-self": (600, 32, 5, "float32", (8, 8), None, None, False),
}

CHILD = r"""
import sys
import numpy as np
import torch
from flows.similarity.topk import topk_cosine_torch
from flows.similarity.triton_groupmax import TritonConfig, group_max_scores, interpreting, rescore_groups

assert interpreting()
data = dict(np.load(sys.argv[1]))
cases = eval(sys.argv[2])  # the three dicts of case parameters, as written by the test
out = {}
for name, (b, n, d, group, offset, dtype, (bm, bn, bk)) in cases[0].items():
    q, k = (torch.from_numpy(data[f"gm-{name}-{t}"]).to(getattr(torch, dtype)) for t in "qk")
    cfg = TritonConfig(block_m=bm, block_n=bn, block_k=bk)
    out[f"gm-{name}"] = group_max_scores(q, k, group=group, exclude_offset=None if offset < 0 else offset,
                                         config=cfg).numpy()
for name, (b, n, d, group, c, offset, qdt, kdt, rows) in cases[1].items():
    q = torch.from_numpy(data[f"rs-{name}-q"]).to(getattr(torch, qdt))
    k = torch.from_numpy(data[f"rs-{name}-k"]).to(getattr(torch, kdt))
    groups = torch.from_numpy(data[f"rs-{name}-groups"])
    cfg = TritonConfig(rescore_rows=rows, rescore_cols=16, rescore_block_d=16)
    out[f"rs-{name}"] = rescore_groups(q, k, groups, group=group, exclude_offset=None if offset < 0 else offset,
                                       config=cfg).numpy()
cfg = TritonConfig(block_m=256, block_n=256, block_k=64, rescore_rows=64, rescore_cols=128, rescore_block_d=64)
for name, (n, d, k, dtype, group_sizes, row_range, block_rows, exclude_self) in cases[2].items():
    idx, val = topk_cosine_torch(torch.from_numpy(data[f"tk-{name}-x"]), k=k, exclude_self=exclude_self,
                                 block_rows=block_rows, row_range=row_range, group_sizes=group_sizes,
                                 score_dtype=getattr(torch, dtype), engine="triton", triton_config=cfg)
    out[f"tk-{name}-idx"], out[f"tk-{name}-val"] = idx.numpy(), val.numpy()
np.savez(sys.argv[3], **out)
"""


def gm_inputs(name):
    b, n, d = GROUP_MAX_CASES[name][:3]
    rng = np.random.default_rng(len(name))
    return rng.standard_normal((b, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32)


def rs_inputs(name):
    """Random distinct groups per row; each row's first is the one holding its own column, row
    0's last is the last group (which holds padding)."""
    b, n, d, group, c, offset = RESCORE_CASES[name][:6]
    rng = np.random.default_rng(len(name) + 1)
    n_groups = -(-n // group)
    groups = np.empty((b, c), np.int64)
    for i in range(b):
        first = (i + max(offset, 0)) // group
        rest = rng.permutation(np.setdiff1d(np.arange(n_groups), [first, n_groups - 1]))[:c - 2]
        groups[i] = [first, *rest, n_groups - 1] if i == 0 else [first, *rng.permutation([*rest, n_groups - 1])[:c - 1]]
    return rng.standard_normal((b, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32), groups


def rounded(a, dtype):
    return a.astype(dtype).astype(np.float64)  # what the kernel reads, exactly


def masked_scores(q, k, offset):
    """float64 (B, N) scores with the column i + offset of row i at -inf."""
    s = q @ k.T
    if offset >= 0:
        rows = np.arange(len(q))
        keep = rows + offset < k.shape[0]
        s[rows[keep], rows[keep] + offset] = -np.inf
    return s


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every case once in a child under TRITON_INTERPRET=1; {name: output array}."""
    tmp = tmp_path_factory.mktemp("triton_interpret")
    data = {}
    for name in GROUP_MAX_CASES:
        data[f"gm-{name}-q"], data[f"gm-{name}-k"] = gm_inputs(name)
    for name in RESCORE_CASES:
        data[f"rs-{name}-q"], data[f"rs-{name}-k"], data[f"rs-{name}-groups"] = rs_inputs(name)
    for name, (n, d, *_) in TOPK_CASES.items():
        data[f"tk-{name}-x"] = unit_rows(n, d, seed=n)
    np.savez(tmp / "in.npz", **data)
    cases = repr((GROUP_MAX_CASES, RESCORE_CASES, TOPK_CASES))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "in.npz"), cases, str(tmp / "out.npz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(tmp / "out.npz"))


@pytest.mark.parametrize("name", GROUP_MAX_CASES)
def test_group_maxima_equal_numpy(interpreted, name):
    b, n, d, group, offset, dtype, _ = GROUP_MAX_CASES[name]
    q, k = (rounded(a, dtype) for a in gm_inputs(name))
    s = masked_scores(q, k, offset)
    n_groups = -(-n // group)
    padded = np.full((b, n_groups * group), -np.inf)
    padded[:, :n] = s
    ref = padded.reshape(b, n_groups, group).max(axis=2)  # contiguous groups
    got = interpreted[f"gm-{name}"]
    assert got.shape == (b, n_groups) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=0, atol=1e-4 * np.sqrt(d))  # fp32 summation
    if group == 1:
        assert np.isneginf(got[np.arange(b), np.arange(b) + offset]).all()


@pytest.mark.parametrize("name", RESCORE_CASES)
def test_rescored_groups_equal_numpy(interpreted, name):
    b, _, d, group, c, offset, qdt, kdt, _ = RESCORE_CASES[name]
    q, k, groups = rs_inputs(name)
    s = masked_scores(rounded(q, qdt), rounded(k, kdt), offset)
    cols = (groups[:, :, None] * group + np.arange(group)).reshape(b, c * group)
    ref = np.take_along_axis(np.pad(s, ((0, 0), (0, group)), constant_values=-np.inf), cols, 1)
    got = interpreted[f"rs-{name}"]
    assert got.shape == (b, c * group) and got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    assert np.isneginf(got).any()  # the cases do reach padding or self
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=0, atol=1e-4 * np.sqrt(d))


@pytest.mark.parametrize("name", TOPK_CASES)
def test_triton_engine_equals_brute_force_and_torch_engine(interpreted, name):
    n, d, k, dtype, _, row_range, _, exclude_self = TOPK_CASES[name]
    x = unit_rows(n, d, seed=n)
    start, stop = row_range or (0, n)
    ref_idx, ref_val = brute_force(x, k, exclude_self)
    idx, val = interpreted[f"tk-{name}-idx"], interpreted[f"tk-{name}-val"]
    full_idx, full_val = np.array(ref_idx), np.array(ref_val, np.float32)  # the answer's rows put in place
    full_idx[start:stop], full_val[start:stop] = idx, val
    assert assert_same_topk(x, full_idx, full_val, ref_idx, ref_val) == 1.0  # continuous data: no ties
    t_idx, t_val = topk_cosine_torch(torch.from_numpy(x), k=k, exclude_self=exclude_self, row_range=row_range,
                                     score_dtype=getattr(torch, dtype), engine="torch")
    np.testing.assert_array_equal(idx, t_idx.numpy())  # continuous data: no ties, same order
    np.testing.assert_allclose(val, t_val.numpy(), atol=1e-5)


def test_engine_choice():
    x = torch.from_numpy(unit_rows(300, 16))
    with pytest.raises(ValueError, match="engine must be"):
        topk_cosine_torch(x, k=4, engine="cuda")
    if not torch.cuda.is_available():
        from flows.similarity.triton_groupmax import interpreting, triton_available

        if triton_available() and not interpreting():
            with pytest.raises(ValueError, match="need cuda tensors"):
                topk_cosine_torch(x, k=4, engine="triton", group_sizes=(16,))
    with pytest.raises(ValueError, match="power of 2"):
        topk_cosine_torch(x, k=4, engine="triton", group_sizes=(12,))
    ref = topk_cosine_torch(x, k=4, engine="torch")
    auto = topk_cosine_torch(x, k=4)  # CPU tensors: the torch engine
    assert all(torch.equal(a, b) for a, b in zip(ref, auto, strict=True))


def compile_for_h100(kernel, dtypes: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    """Compile a kernel for sm_90 without a GPU (ptxas ships with triton), specialised as a
    launch with d = 768 would be: 16-aligned pointers, d and the row strides multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = {name: dtypes.get(name, "constexpr" if name in constexprs else "i32") for name in kernel.arg_names}
    aligned = [name for name in kernel.arg_names if name.endswith("_ptr") or name in ("d", "stride_q", "stride_k")]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages})


def test_kernels_compile_for_h100_with_a_pipelined_tensor_core_loop():
    """No GPU needed: the default-config kernels compile for sm_90, and the GEMM's K loop is
    software-pipelined (cp.async into shared memory) on wgmma tensor-core instructions."""
    from flows.similarity import triton_groupmax as tg

    if not tg.triton_available() or tg.interpreting():
        pytest.skip("needs triton, not in interpreter mode")
    cfg = tg.TritonConfig()
    gm = compile_for_h100(tg._group_max_kernel, {"q_ptr": "*fp16", "k_ptr": "*fp16", "out_ptr": "*fp32"},
                          {"EXCLUDE": True, "GROUP": 16, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                           "BLOCK_K": cfg.block_k, "EVEN_K": True, "PRECISION": "tf32"}, cfg.num_warps, cfg.num_stages)
    assert "async_copy_global_to_local" in gm.asm["ttgir"] and "wgmma" in gm.asm["ptx"]
    rs = compile_for_h100(tg._rescore_kernel, {"q_ptr": "*fp16", "k_ptr": "*fp16", "groups_ptr": "*i64",
                                               "out_ptr": "*fp32"},
                          {"EXCLUDE": True, "GROUP": 16, "BLOCK_R": cfg.rescore_rows,
                           "BLOCK_C": cfg.rescore_cols // 16, "BLOCK_D": cfg.rescore_block_d}, cfg.rescore_num_warps)
    assert rs.asm["cubin"]


@CUDA
def test_triton_engine_equals_torch_engine_on_200k():
    from flows.similarity.triton_groupmax import triton_available

    if not triton_available():
        pytest.skip("triton is not importable")
    x = torch.nn.functional.normalize(torch.randn(200_000, 128, device="cuda", generator=torch.Generator(
        device="cuda").manual_seed(0)), dim=1).half()
    t_idx, t_val = topk_cosine_torch(x, k=32, engine="torch")
    idx, val = topk_cosine_torch(x, k=32, engine="triton")
    assert (torch.sort(idx, dim=1).values == torch.sort(t_idx, dim=1).values).all(dim=1).float().mean() > 0.999
    assert (val - t_val).abs().max() < 1e-3  # both rescored exactly in fp32
    assert (idx != torch.arange(len(x), device="cuda")[:, None]).all()

"""Triton kernels for the ``triton`` engine of ``topk.topk_cosine_torch``.

- ``group_max_scores``: the fp16 GEMM of a block of query rows against all N keys, fused
  with the first level of the group-max select. Each program computes one BLOCK_M x BLOCK_N
  tile of scores in registers (fp32 accumulation), sets padding columns and the excluded
  diagonal to -inf, and stores only the maxima of *contiguous* groups of ``group`` columns
  (BLOCK_N is a multiple of ``group``). The (B, N) score matrix is never written to memory;
  the output is (B, ceil(N / group)) float32.
- ``rescore_groups``: the scores inside the chosen groups, recomputed exactly (inputs cast
  to fp32, fp32 accumulation) from the key rows, one program per (BLOCK_R query rows,
  BLOCK_C groups). Nothing is gathered into a temporary: the key rows are read where they lie.

triton is imported here, guarded: without it ``triton_available()`` is False and the
wrappers raise; importing ``flows.similarity`` never needs it (topk imports this module only
when the triton engine is chosen). With ``TRITON_INTERPRET=1`` set before this module is
first imported, the kernels run in Triton's interpreter on CPU tensors (the tests do this);
otherwise they need cuda tensors.

Untimed on a GPU so far: the tile sizes, num_warps and num_stages in ``TritonConfig`` are
the usual fp16 GEMM starting points for an H100, not measured choices. Compiled for sm_90
without a GPU (a test does this), the default GEMM's loop is a 3-stage cp.async pipeline
on wgmma instructions, 114 registers, no spills, when d and the row strides are multiples
of 16 and the pointers 16-byte aligned (as for d = 768); otherwise the loads are narrower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with the cuda torch wheels
    triton = None
    tl = None


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. block_m/n/k: the GEMM tile of ``group_max_scores`` (each >= 16, a
    power of 2; block_n is raised to ``group`` when smaller). rescore_rows x rescore_cols:
    the query rows and columns scored per program of ``rescore_groups`` (rows a power of 2;
    BLOCK_C = rescore_cols // group groups, at least 1); rescore_block_d: the slice of d
    loaded per step there. The interpreter (tests) wants few, large programs."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    rescore_rows: int = 1
    rescore_cols: int = 64
    rescore_block_d: int = 128
    rescore_num_warps: int = 4


def triton_available() -> bool:
    """Whether triton imported (it does not say whether a GPU is present)."""
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels were defined under TRITON_INTERPRET=1 (then they take CPU tensors)."""
    return triton is not None and type(_group_max_kernel).__name__ == "InterpretedFunction"


if triton is not None:

    @triton.jit(do_not_specialize=["n_rows", "n_cols", "exclude_offset"])
    def _group_max_kernel(q_ptr, k_ptr, out_ptr, n_rows, n_cols, d, stride_q, stride_k, stride_out,
                          exclude_offset, EXCLUDE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                          PRECISION: tl.constexpr):
        # Row tiles vary fastest: the programs in flight share one tile of keys (read from
        # memory once) while the block of queries stays in L2.
        pid = tl.program_id(0)
        n_row_tiles = tl.cdiv(n_rows, BLOCK_M)
        pid_m = pid % n_row_tiles
        pid_n = pid // n_row_tiles
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows/columns wrap to valid ones (no load masks); they are masked below.
        q_ptrs = q_ptr + (rows % n_rows).to(tl.int64)[:, None] * stride_q + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
        k_ptrs = k_ptr + (cols % n_cols).to(tl.int64)[None, :] * stride_k + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            if EVEN_K:
                a = tl.load(q_ptrs)
                b = tl.load(k_ptrs)
            else:
                a = tl.load(q_ptrs, mask=offs_k[None, :] < d - k0, other=0.0)
                b = tl.load(k_ptrs, mask=offs_k[:, None] < d - k0, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            q_ptrs += BLOCK_K
            k_ptrs += BLOCK_K
        valid = cols[None, :] < n_cols
        if EXCLUDE:
            valid = valid & (cols[None, :] != rows[:, None] + exclude_offset)
        acc = tl.where(valid, acc, float("-inf"))
        group_max = tl.max(tl.reshape(acc, (BLOCK_M, BLOCK_N // GROUP, GROUP)), axis=2)  # (BLOCK_M, BLOCK_N // GROUP)
        groups = pid_n * (BLOCK_N // GROUP) + tl.arange(0, BLOCK_N // GROUP)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + groups[None, :]
        tl.store(out_ptrs, group_max, mask=(rows[:, None] < n_rows) & (groups[None, :] < tl.cdiv(n_cols, GROUP)))

    @triton.jit(do_not_specialize=["n_rows", "n_cols", "n_chosen", "exclude_offset"])
    def _rescore_kernel(q_ptr, k_ptr, groups_ptr, out_ptr, n_rows, n_cols, n_chosen, d, stride_q, stride_k,
                        stride_groups, stride_out, exclude_offset, EXCLUDE: tl.constexpr, GROUP: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
        e = tl.arange(0, BLOCK_C * GROUP)  # (CG,): flat (chosen group, column within it)
        slot = tl.program_id(1) * BLOCK_C + e // GROUP  # which of a row's chosen groups
        in_use = (rows[:, None] < n_rows) & (slot[None, :] < n_chosen)  # (R, CG)
        group = tl.load(groups_ptr + rows.to(tl.int64)[:, None] * stride_groups + slot[None, :], mask=in_use,
                        other=0)
        cols = group * GROUP + (e % GROUP)[None, :]  # (R, CG)
        valid = in_use & (cols < n_cols)
        k_rows = k_ptr + tl.where(valid, cols, 0).to(tl.int64)[:, :, None] * stride_k  # (R, CG, 1)
        q_rows = q_ptr + (rows % n_rows).to(tl.int64)[:, None] * stride_q  # (R, 1)
        acc = tl.zeros((BLOCK_R, BLOCK_C * GROUP), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_rows + offs[None, :], mask=offs[None, :] < d, other=0.0).to(tl.float32)  # (R, D)
            keys = tl.load(k_rows + offs[None, None, :], mask=valid[:, :, None] & (offs[None, None, :] < d),
                           other=0.0)  # (R, CG, D)
            acc += tl.sum(keys.to(tl.float32) * q[:, None, :], axis=2)
        if EXCLUDE:
            valid = valid & (cols != rows[:, None] + exclude_offset)
        acc = tl.where(valid, acc, float("-inf"))
        out_cols = slot * GROUP + e % GROUP
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + out_cols[None, :], acc, mask=in_use)


def group_max_scores(queries, keys, *, group: int, exclude_offset: int | None = None,
                     config: TritonConfig | None = None):
    """(B, ceil(N / group)) float32: entry (i, j) is the max of queries[i] . keys[c] over the
    columns c in [j * group, (j + 1) * group) that exist (c < N), leaving out c == i +
    exclude_offset when exclude_offset is given (-inf when no column is left).

    queries (B, d) and keys (N, d): float16, bfloat16 or float32, same dtype and device; the
    products accumulate in fp32 (fp32 inputs: exact fp32 products, no tf32).
    group: a power of 2.
    """
    import torch

    _check_ready(queries, keys)
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of 2, got {group}")
    if queries.dtype != keys.dtype:
        raise ValueError(f"queries are {queries.dtype}, keys {keys.dtype}: one dtype for the GEMM")
    cfg = config or TritonConfig()
    queries, keys = _rows_contiguous(queries), _rows_contiguous(keys)
    (b, d), n = queries.shape, keys.shape[0]
    out = torch.empty((b, math.ceil(n / group)), dtype=torch.float32, device=queries.device)
    if b == 0 or n == 0:
        return out
    block_n = max(cfg.block_n, group)
    grid = (triton.cdiv(b, cfg.block_m) * triton.cdiv(n, block_n),)
    _group_max_kernel[grid](
        queries, keys, out, b, n, d, queries.stride(0), keys.stride(0), out.stride(0),
        0 if exclude_offset is None else exclude_offset,
        EXCLUDE=exclude_offset is not None, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
        BLOCK_K=cfg.block_k, EVEN_K=d % cfg.block_k == 0,
        PRECISION="ieee" if queries.dtype == torch.float32 else "tf32",  # tf32 applies to fp32 inputs only
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def rescore_groups(queries, keys, groups, *, group: int, exclude_offset: int | None = None,
                   config: TritonConfig | None = None):
    """(B, c * group) float32 exact scores of the columns of the chosen groups.

    groups (B, c) int64: group ids (column j * group ... (j + 1) * group - 1) per query row.
    Entry (i, s * group + t) is queries[i] . keys[groups[i, s] * group + t] in fp32, or -inf
    for a column >= N or (with exclude_offset) the column i + exclude_offset. queries and keys
    may differ in dtype (each is cast to fp32).
    """
    import torch

    _check_ready(queries, keys)
    if group < 1 or group & (group - 1):
        raise ValueError(f"group must be a power of 2, got {group}")
    cfg = config or TritonConfig()
    queries, keys = _rows_contiguous(queries), _rows_contiguous(keys)
    groups = groups.contiguous()
    (b, d), n, c = queries.shape, keys.shape[0], groups.shape[1]
    out = torch.empty((b, c * group), dtype=torch.float32, device=queries.device)
    if b == 0 or c == 0:
        return out
    block_c = max(1, cfg.rescore_cols // group)
    block_c = 1 << (block_c.bit_length() - 1)  # a power of 2, so BLOCK_C * GROUP is one
    grid = (triton.cdiv(b, cfg.rescore_rows), triton.cdiv(c, block_c))
    _rescore_kernel[grid](
        queries, keys, groups, out, b, n, c, d, queries.stride(0), keys.stride(0), groups.stride(0),
        out.stride(0), 0 if exclude_offset is None else exclude_offset,
        EXCLUDE=exclude_offset is not None, GROUP=group, BLOCK_R=cfg.rescore_rows, BLOCK_C=block_c,
        BLOCK_D=cfg.rescore_block_d, num_warps=cfg.rescore_num_warps)
    return out


def _check_ready(queries, keys) -> None:
    if triton is None:
        raise RuntimeError("triton is not importable; use the torch engine")
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must be (B, d) and (N, d), got {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if queries.device != keys.device:
        raise ValueError(f"queries on {queries.device}, keys on {keys.device}")
    if not queries.is_cuda and not interpreting():
        raise ValueError("the triton kernels need cuda tensors (or TRITON_INTERPRET=1 set before import)")


def _rows_contiguous(t):
    return t if t.stride(1) == 1 else t.contiguous()

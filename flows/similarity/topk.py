"""Exact top-k cosine neighbours, blockwise over query rows: never an N x N matrix.

Rows are L2-normalised, so cosine = inner product. Memory is O(N*k) for the answer plus one
block of scores; the input itself (N x d) is held once more in the engine's dtype at most.

Three engines, one contract (``topk_cosine``):

- **cpu: faiss** (``faiss.knn`` with the inner-product metric, called per block of query
  rows). faiss scores 4096 x 1024 tiles with BLAS and keeps a heap per query, so nothing
  grows with N^2. On the 2-core machines a naive torch matmul + topk was 25% slower than
  faiss IndexFlatIP (DESIGN section 6), so the well-kept library is the engine, and it
  gives the baseline's neighbours exactly. Exact means N^2: 83 s for 100k x 768 on 2 cores,
  days at millions of rows, so above CPU_WARN_ROWS a warning gives the estimate.
- **torch** (cuda; also runs on CPU tensors, which the tests use): per block of B query rows
  one GEMM into a (B, N) score buffer, then a *group-max select* instead of torch.topk over
  1M-long rows (which dominated on an H100, DESIGN section 6). Columns are cut into groups
  of g; the top-c entries of a row lie in at most c groups, and every such group's max is
  >= the c-th value, so the c groups with the largest maxima hold them all (up to ties).
  One pass of max over the buffer, then top-c over short rows only (``_select_top``). On
  cuda the GEMM runs in fp16 (fp32 accumulation); the c = k + margin candidates are then
  rescored exactly in fp32 and the best k kept, so fp16 rounding of the scores (<= 2.5e-4
  near 1) can only swap neighbours whose exact values lie within about 5e-4 of each other.
  H100, N = 1M, d = 768, k = 32 (2026-11-27, bench_similarity.py): the blockwise GEMM alone
  2.56 s, naive matmul + topk 9.3 s, this engine 4.04 s with group_sizes (64, 16): the max
  pass over the buffer ~0.9 s, selects and rescoring ~0.6 s. Contiguous groups (a max over
  a short innermost axis) ran at a fifth of memory speed and cost 7.4 s in all.
- **triton** (cuda; ``topk_cosine_torch(engine="triton")``, opt-in until a GPU run shows it
  faster): the same select without the (B, N) buffer. A Triton kernel
  (``triton_groupmax.group_max_scores``) computes each fp16 GEMM tile in registers, sets
  self and padding to -inf, and writes only the maxima of *contiguous* groups of g columns
  (g a power of 2, inside the kernel's column tile): a (B, N / g) float32 tensor. The higher
  levels and the select of the c best groups run as above on that tensor; then a second
  kernel (``rescore_groups``) recomputes the c * g scores of the chosen groups exactly in
  fp32 from the rows of x, and the best k of those are kept. Same argument, same answer up
  to ties. g trades the maxima's size (N / g per row) against the rescoring's reads (c * g
  key rows per query row), so the default levels are (16, 16, 16), not (64, 16).
  Untimed on a GPU so far: checked for correctness in Triton's interpreter on CPU tensors
  and compiled for sm_90 without a GPU (tests); speed on an H100 is not known yet.

Output order in each row: value descending, then index ascending. At an exact tie on the
k-th value, which tied neighbour is kept is deterministic per engine, not specified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

NORM_CHECK_ROWS = 65536  # rows whose norms are checked at once
NORM_TOLERANCE = 1e-2  # |norm - 1| above this is not an L2-normalised row (fp16 rows are ~1e-3 off)
CPU_QUERY_BLOCK = 8192  # faiss tiles queries by 4096 itself; a block only bounds our per-call output
TORCH_BUFFER_BYTES = {"cuda": 4 << 30, "cpu": 256 << 20}  # per block: the (B, N) scores and per-row temporaries
CPU_WARN_ROWS = 1_000_000  # above this many rows the exact CPU search takes days: a warning says so
CPU_SECONDS_PER_1E10_PAIRS = 83.0  # faiss, d = 768, 2 threads: 100k x 100k rows took 83 s (scale review)
TORCH_GROUP_SIZES = (64, 16)  # measured on an H100 (module docstring)
TRITON_GROUP_SIZES = (16, 16, 16)  # not measured: a small first group keeps the exact rescoring cheap


def effective_k(n: int, k: int, exclude_self: bool) -> int:
    """Columns of the answer: k, or fewer when the rows have fewer than k candidates."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return max(0, min(k, n - 1 if exclude_self else n))


def topk_cosine(x: np.ndarray, *, k: int, exclude_self: bool = True, block_rows: int | None = None,
                device: str = "auto", row_range: tuple[int, int] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of every row of ``x`` (exact, by inner product).

    x: (N, d) float16 or float32, each row L2-normalised (checked; zero rows are rejected).
    k: neighbours per row; the answer has ``effective_k(N, k, exclude_self)`` columns, which is
        k unless N is too small (empty input gives (0, 0) arrays).
    exclude_self: drop the row itself from its own neighbours (it is dropped by index, so an
        exact duplicate of the row is still a neighbour).
    block_rows: at most this many query rows scored at once; None picks a default per engine.
        On torch (cuda) the memory budget TORCH_BUFFER_BYTES caps it either way.
    device: "cpu" (faiss), "cuda" (torch on the GPU) or "auto" (cuda when torch sees one).
    row_range: (start, stop) to answer only those query rows against all N (a shard of the
        work); the answer then has stop - start rows, row 0 being ``start``.
    progress: called with the number of query rows after each block (e.g. Progress.update).
    Returns (indices int64 (R, k'), values float32 (R, k')), R the number of query rows.
    """
    x = _check_array(x)
    n = x.shape[0]
    start, stop = (0, n) if row_range is None else row_range
    if not 0 <= start <= stop <= n:
        raise ValueError(f"row_range {row_range} is outside [0, {n}]")
    k_out = effective_k(n, k, exclude_self)
    if stop == start or k_out == 0:
        _check_norms(x)  # bad rows fail even where there is nothing to search
        return np.zeros((stop - start, k_out), np.int64), np.zeros((stop - start, k_out), np.float32)
    device = resolve_device(device)
    if device == "cpu":
        _check_norms(x)
        if n > CPU_WARN_ROWS:
            _warn_cpu_cost(n, stop - start, x.shape[1])
        return _topk_faiss(x, k=k_out, exclude_self=exclude_self, block_rows=block_rows or CPU_QUERY_BLOCK,
                           start=start, stop=stop, progress=progress)
    import torch

    xt = torch.from_numpy(x).to(device)
    _check_norms_torch(xt)  # on the device: numpy's float16 -> float32 took ~3 s of a 7 s call at 1M x 768
    idx, val = topk_cosine_torch(xt, k=k, exclude_self=exclude_self, block_rows=block_rows, row_range=(start, stop),
                                 progress=progress)
    return idx.cpu().numpy(), val.cpu().numpy()


def cpu_search_seconds(n: int, rows: int, d: int, threads: int) -> float:
    """Rough time of the exact faiss search: rows queries against n keys of width d.

    Scaled from the measurement in CPU_SECONDS_PER_1E10_PAIRS: linear in rows * n * d, and in
    the thread count (a guess: BLAS and faiss's heaps both spread over threads).
    """
    return CPU_SECONDS_PER_1E10_PAIRS * (rows * n / 1e10) * (d / 768) * (2 / max(1, threads))


def _warn_cpu_cost(n: int, rows: int, d: int) -> None:
    import faiss

    threads = faiss.omp_get_max_threads()
    seconds = cpu_search_seconds(n, rows, d, threads)
    days, hours = seconds / 86400, seconds / 3600
    took = f"{days:.1f} days" if days >= 2 else f"{hours:.1f} hours" if hours >= 2 else f"{seconds / 60:.0f} minutes"
    log.warning("exact top-k on CPU (faiss) for %s x %s rows (d = %d) grows as N^2: about %s on %d threads "
                "(estimate: %.0f s per 1e10 row pairs at d = 768 on 2 threads). Set similarity.device: cuda "
                "(the torch engine did 1M x 768 in 4 s on an H100).", f"{rows:,}", f"{n:,}", d, took, threads,
                CPU_SECONDS_PER_1E10_PAIRS)


def _check_array(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"x must be a 2-D numpy array, got {type(x).__name__} {getattr(x, 'shape', '')}")
    if x.dtype not in (np.float16, np.float32):
        raise ValueError(f"x must be float16 or float32, got {x.dtype}")
    return np.ascontiguousarray(x)


def _check_norms(x: np.ndarray) -> None:
    for r0 in range(0, x.shape[0], NORM_CHECK_ROWS):  # chunked: no full-size float32 temporary
        chunk = x[r0:r0 + NORM_CHECK_ROWS].astype(np.float32)
        _raise_on_bad_norm(np.sqrt(np.einsum("nd,nd->n", chunk, chunk)), r0)


def _check_norms_torch(x) -> None:
    """_check_norms on a tensor, on its device, read back once."""
    import torch

    if x.shape[0] == 0:
        return
    ok = torch.cat([(x[r0:r0 + NORM_CHECK_ROWS].float().norm(dim=1) - 1.0).abs() <= NORM_TOLERANCE  # NaN: not ok
                    for r0 in range(0, x.shape[0], NORM_CHECK_ROWS)])  # (N,) bool
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        _raise_on_bad_norm(x[row:row + 1].float().norm(dim=1).cpu().numpy(), row)


def _raise_on_bad_norm(norms: np.ndarray, r0: int) -> None:
    bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)  # NaN counts as bad
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"row {r0 + row} has norm {norms[row]:.4g}; rows must be L2-normalised and finite")


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _topk_faiss(x, *, k, exclude_self, block_rows, start, stop, progress=None):
    import faiss

    xb = np.ascontiguousarray(x, dtype=np.float32)  # faiss scores float32; no copy when x is already
    k_search = k + 1 if exclude_self else k
    out_idx = np.empty((stop - start, k), np.int64)
    out_val = np.empty((stop - start, k), np.float32)
    for r0 in range(start, stop, block_rows):
        r1 = min(r0 + block_rows, stop)
        val, idx = faiss.knn(xb[r0:r1], xb, k_search, metric=faiss.METRIC_INNER_PRODUCT)  # (B, k_search)
        if exclude_self:
            idx, val = _drop_self(idx, val, np.arange(r0, r1))
        idx, val = _order_rows(idx, val)
        out_idx[r0 - start:r1 - start], out_val[r0 - start:r1 - start] = idx, val
        if progress is not None:
            progress(r1 - r0)
    return out_idx, out_val


def _drop_self(idx: np.ndarray, val: np.ndarray, rows: np.ndarray):
    """(B, k+1) -> (B, k): remove each row's own index, or its last column if self fell out.

    Self falls out of its own top k+1 only when k+1 others score at least as high (duplicates).
    """
    keep = idx != rows[:, None]
    keep[keep.all(axis=1), -1] = False
    b = idx.shape[0]
    return idx[keep].reshape(b, -1), val[keep].reshape(b, -1)


def _order_rows(idx: np.ndarray, val: np.ndarray):
    """Sort each row by value descending, then index ascending (heaps leave ties unordered)."""
    order = np.lexsort((idx, -val), axis=-1) if idx.size else np.zeros(idx.shape, np.int64)
    return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)


def topk_cosine_torch(x, *, k: int, exclude_self: bool = True, block_rows: int | None = None,
                      row_range: tuple[int, int] | None = None, group_sizes: tuple[int, ...] | None = None,
                      margin: int | None = None, score_dtype=None, engine: str = "auto", triton_config=None,
                      progress: Callable[[int], None] | None = None):
    """``topk_cosine`` on a torch tensor, on its own device; returns (indices, values) tensors there.

    x: (N, d) float16/bfloat16/float32 tensor of L2-normalised rows (not checked here).
    group_sizes: fan-out of each level of the group-max select (module docstring); () means
        plain torch.topk over whole rows. Default TORCH_GROUP_SIZES or TRITON_GROUP_SIZES by
        engine; for the triton engine the first level (the kernel's group) must be a power of 2.
    margin: extra candidates rescored exactly; default 0 when scores are float32, else
        max(8, k // 4).
    score_dtype: dtype of the GEMM and score buffer; default float16 on cuda, float32 elsewhere.
    engine: "torch", "triton" (module docstring) or "auto": torch for now, the one timed on a
        GPU; the triton engine is opt-in until it is. Where no group level applies (few
        columns), both engines run the torch path's plain topk.
    triton_config: ``triton_groupmax.TritonConfig`` (tile sizes) for the triton engine.
    progress: called with the number of query rows after each block is queued (no device sync).
    """
    import torch

    engine = _resolve_engine(engine, x)
    if group_sizes is None:
        group_sizes = TRITON_GROUP_SIZES if engine == "triton" else TORCH_GROUP_SIZES
    n, d = x.shape
    start, stop = (0, n) if row_range is None else row_range
    k_out = effective_k(n, k, exclude_self)
    out_idx = torch.empty((stop - start, k_out), dtype=torch.int64, device=x.device)
    out_val = torch.empty((stop - start, k_out), dtype=torch.float32, device=x.device)
    if stop == start or k_out == 0:
        return out_idx, out_val
    if score_dtype is None:
        score_dtype = torch.float16 if x.is_cuda else torch.float32
    if margin is None:
        margin = 0 if score_dtype == torch.float32 else max(8, k // 4)
    n_cand = min(k_out + margin, n)  # candidates taken from the score buffer, rescored exactly
    levels = _select_levels(n, n_cand, group_sizes)
    if engine == "triton" and levels:
        _topk_triton(x, out_idx, out_val, k_out=k_out, n_cand=n_cand, levels=levels, exclude_self=exclude_self,
                     block_rows=block_rows, start=start, stop=stop, score_dtype=score_dtype, config=triton_config,
                     progress=progress)
        return out_idx, out_val
    n_pad = math.ceil(n / levels[0]) * levels[0] if levels else n  # the select wants whole groups
    # No padded copy of the keys: the GEMM writes the first n columns of a (B, n_pad) buffer whose
    # padding columns were set to -inf once (cuBLAS and CPU BLAS take its row stride n_pad as the
    # leading dimension). x itself is the keys when it has the score dtype; else one cast copy.
    keys = x if x.dtype == score_dtype else x.to(score_dtype)
    score_bytes = keys.element_size()
    per_row = (n_pad + (n_pad // levels[0] if levels else 0)) * score_bytes  # scores + first group maxima
    per_row += n_cand * d * (x.element_size() + 4)  # the rescoring's gathered rows, then as float32
    block_rows = budget_block_rows(block_rows, per_row, TORCH_BUFFER_BYTES["cuda" if x.is_cuda else "cpu"],
                                   stop - start)
    buffer = torch.empty((block_rows, n_pad), dtype=score_dtype, device=x.device)
    if n_pad > n:
        buffer[:, n:] = -math.inf  # padding columns: never written by the GEMM
    with torch.no_grad():
        for r0 in range(start, stop, block_rows):
            r1 = min(r0 + block_rows, stop)
            scores = buffer[:r1 - r0]  # (B, n_pad)
            torch.mm(keys[r0:r1], keys.T, out=scores[:, :n])
            if exclude_self:
                scores.diagonal(offset=r0).fill_(-math.inf)  # (i, r0 + i) for each block row i
            cand_val, cols = _select_top(scores, n_cand, levels)  # (B, c) each
            del scores
            exact = torch.bmm(x[cols.clamp(max=n - 1)].float(), x[r0:r1].float()[:, :, None])[:, :, 0]  # (B, c)
            exact.masked_fill_(cand_val == -math.inf, -math.inf)  # self/padding, only if c > valid columns; no sync
            by_index = cols.argsort(dim=1)
            cols, exact = cols.gather(1, by_index), exact.gather(1, by_index)
            best = exact.argsort(dim=1, descending=True, stable=True)[:, :k_out]  # ties: lower index first
            out_idx[r0 - start:r1 - start] = cols.gather(1, best)
            out_val[r0 - start:r1 - start] = exact.gather(1, best)
            if progress is not None:
                progress(r1 - r0)
    return out_idx, out_val


def budget_block_rows(block_rows: int | None, per_row_bytes: int, budget: int, rows: int) -> int:
    """Query rows per block of the torch and triton engines.

    As many rows as ``budget`` bytes hold at per_row_bytes each (whole 256-row GEMM tiles when
    it holds more than 256), and no more than block_rows when given: an explicit block_rows is
    an upper limit, never a way past the budget (params.yaml's 4096 rows x N = 6.5M fp16 scores
    would be 53 GB). At most ``rows``, at least 1.
    """
    fit = max(1, budget // max(1, per_row_bytes))
    fit = fit // 256 * 256 or fit
    return max(1, min(rows, fit if block_rows is None else min(block_rows, fit)))


def _resolve_engine(engine: str, x) -> str:
    if engine not in ("auto", "torch", "triton"):
        raise ValueError(f"engine must be auto, torch or triton, got {engine!r}")
    if engine == "auto":  # the engine timed on a GPU (4.04 s for 1M x 768 top-32 on an H100); the
        return "torch"  # triton engine becomes the default once benchmarks/gpu_checks.sh shows it faster
    return engine


def _topk_triton(x, out_idx, out_val, *, k_out, n_cand, levels, exclude_self, block_rows, start, stop,
                 score_dtype, config, progress=None):
    """The triton engine: fills out_idx/out_val (rows start..stop) in place.

    Per block: the kernel's group maxima (B, ceil(N / g)), the select of the n_cand best
    groups over the higher levels, the exact fp32 scores of those groups' c * g columns, and
    the best k_out of those (value descending, then index ascending).
    """
    import torch

    from flows.similarity import triton_groupmax

    n = x.shape[0]
    g = levels[0]
    if g & (g - 1):
        raise ValueError(f"the triton engine's first group size must be a power of 2, got {g}")
    keys = x.to(score_dtype).contiguous()  # no copy when x already is
    width = math.ceil(n / g)
    # per row: the float32 group maxima, twice when the select pads them to whole groups of the
    # next level (a copy), and the exact scores of the chosen groups
    per_row = width * 4 * (2 if len(levels) > 1 and width % levels[1] else 1) + n_cand * g * 4
    block_rows = budget_block_rows(block_rows, per_row, TORCH_BUFFER_BYTES["cuda" if x.is_cuda else "cpu"],
                                   stop - start)
    with torch.no_grad():
        for r0 in range(start, stop, block_rows):
            r1 = min(r0 + block_rows, stop)
            offset = r0 if exclude_self else None
            maxima = triton_groupmax.group_max_scores(keys[r0:r1], keys, group=g, exclude_offset=offset,
                                                      config=config)  # (B, ceil(N / g))
            _, groups = _select_top(maxima, n_cand, levels[1:])  # (B, c) group ids
            del maxima
            groups = groups.sort(dim=1).values  # so that the c * g columns below are ascending
            exact = triton_groupmax.rescore_groups(x[r0:r1], x, groups, group=g, exclude_offset=offset,
                                                   config=config)  # (B, c * g), -inf at self/padding
            pos = exact.topk(k_out, dim=1, sorted=False).indices.sort(dim=1).values  # ascending column
            val = exact.gather(1, pos)
            order = val.argsort(dim=1, descending=True, stable=True)  # ties: lower index first
            pos = pos.gather(1, order)
            out_idx[r0 - start:r1 - start] = groups.gather(1, pos // g) * g + pos % g
            out_val[r0 - start:r1 - start] = val.gather(1, order)
            if progress is not None:
                progress(r1 - r0)


def _select_levels(n: int, c: int, group_sizes: tuple[int, ...]) -> list[int]:
    """The fan-outs actually used: a level is kept only while it leaves more than c groups."""
    levels, width = [], n
    for g in group_sizes:
        if g < 2 or math.ceil(width / g) <= c:
            break
        levels.append(g)
        width = math.ceil(width / g)
    return levels


def _select_top(scores, c: int, levels: list[int]):
    """Top-c (values, columns) of each row of scores (B, n_pad), in no particular order.

    Level l+1 holds the maxima of groups of levels[l] entries of level l (padded with -inf).
    Descending from the top, the c largest entries of a level lie in the c groups with the
    largest maxima, so each step is a top-c over c * g gathered entries, never a long row.
    A group is strided, not contiguous: entry p of a level of width g * W is the max of
    entries p, p + W, ..., p + (g-1) W below it. The max then runs across g contiguous slabs
    (one coalesced pass at memory speed), where torch's max over a short innermost axis ran
    at a fifth of it on an H100 (fp16, g = 8..64).
    """
    import torch
    import torch.nn.functional as F

    if not levels:
        return scores.topk(c, dim=1, sorted=False)
    b = scores.shape[0]
    pyramid = [scores]  # (B, width_l) per level, each width padded to a multiple of levels[l]
    for l, g in enumerate(levels):
        if pyramid[l].shape[1] % g:
            pyramid[l] = F.pad(pyramid[l], (0, g - pyramid[l].shape[1] % g), value=-math.inf)
        pyramid.append(pyramid[l].view(b, g, -1).amax(dim=1))  # (B, width_l / g)
    strides = [pyramid[l].shape[1] // g for l, g in enumerate(levels)]  # before any later padding
    pos = pyramid[-1].topk(c, dim=1, sorted=False).indices  # (B, c) groups of the top level
    for l in reversed(range(len(levels))):
        g, width = levels[l], strides[l]
        children = (pos[:, :, None] + torch.arange(g, device=scores.device) * width).view(b, c * g)  # (B, c*g)
        values, chosen = pyramid[l].gather(1, children).topk(c, dim=1, sorted=False)  # (B, c)
        pos = children.gather(1, chosen)
    return values, pos

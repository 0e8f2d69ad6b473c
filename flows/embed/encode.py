"""The forward pass: batches of preprocessed subjects -> L2-normalised float16 embeddings.

Shared by the stage and by benchmarks/bench_embed.py, so that the bare-model baseline runs
exactly the same forward (same autocast, same normalisation) as the stage.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F


class EncodedBatch(NamedTuple):
    indices: np.ndarray  # (B,) int64 rows of the work table
    embeddings: np.ndarray  # (B, D) float16, unit L2 norm (to float16 rounding)
    reasons: list[str]  # per row: "" or the reason the subject could not be cut out
    details: list[str]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full fp32 on the CPU (where bf16 matmuls are slower, not faster)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def encode_pixels(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) on the model's device -> (B, D) float16 unit vectors, still on that device."""
    with torch.inference_mode(), autocast(pixels.device):
        features = model.encode_image(pixels)  # (B, D), bf16 under autocast
    # Normalise in fp32: bf16/fp16 sums of squares lose the last digits that r_ij needs.
    return F.normalize(features.float(), dim=-1).to(torch.float16)


LAUNCHED_AHEAD = 2  # batches queued on the device before the oldest is handed back


def encode_batches(model: torch.nn.Module, pieces: Iterable, device: torch.device, *, batch_rows: int,
                   on_device: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   ahead: int | None = None) -> Iterator[EncodedBatch]:
    """Encode DataLoader pieces (index, pixels, reason, detail) in order, ``batch_rows`` rows per forward.

    The loader's workers each prepare a piece of a model batch (flows.embed.stage.WORKER_ROWS
    rows), so the first batch is ready in a fraction of the time one worker would take for all
    of it; the pieces are copied to the device as they come and joined there.

    ``on_device`` finishes the preprocessing on the device (the ``device`` half of
    flows.embed.preprocess.split_preprocess: uint8 -> normalised float).

    Results are handed back ``ahead`` batches late, and the copy back of batch i is queued right
    after its forward, before batch i+1's: waiting for it never waits for a later batch. So while
    the caller writes batch i and the loader's next pieces arrive, ``ahead`` batches are queued
    on the device: a late piece or a slow write has that much device work to hide behind.
    """
    ahead = LAUNCHED_AHEAD if ahead is None else ahead
    pending: deque[tuple] = deque()
    parts, rows = [], 0
    for piece in pieces:
        parts.append(_to_device(piece, device))
        rows += len(parts[-1][0])
        if rows < batch_rows:
            continue
        pending.append(_launch(model, parts, on_device))
        parts, rows = [], 0
        if len(pending) > ahead:
            yield _fetch(*pending.popleft())
    if parts:
        pending.append(_launch(model, parts, on_device))
    while pending:
        yield _fetch(*pending.popleft())


def _to_device(piece, device: torch.device) -> tuple:
    indices, pixels, reasons, details = piece
    return indices, pixels.to(device, non_blocking=True), list(reasons), list(details)  # pixels (b, 3, S, S)


def _launch(model: torch.nn.Module, parts: list[tuple], on_device) -> tuple:
    """Queue one batch's forward and the copy of its embeddings to host memory; nothing waits here."""
    indices = torch.cat([p[0] for p in parts])
    pixels = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])  # (B, 3, S, S)
    if on_device is not None:
        pixels = on_device(pixels)
    embeddings = encode_pixels(model, pixels)  # (B, D) float16 on the device
    done = None
    if embeddings.is_cuda:
        host = torch.empty(embeddings.shape, dtype=embeddings.dtype, pin_memory=True)
        host.copy_(embeddings, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(embeddings.device))  # the copy's stream, whichever GPU is current
        embeddings = host
    return (indices, embeddings, done, [r for p in parts for r in p[2]], [d for p in parts for d in p[3]])


def _fetch(indices: torch.Tensor, embeddings: torch.Tensor, done, reasons: list[str],
           details: list[str]) -> EncodedBatch:
    if done is not None:
        done.synchronize()  # this batch's copy only: the next batch's forward is queued behind it
    return EncodedBatch(indices.numpy().astype(np.int64), embeddings.numpy(), reasons, details)

"""The forward pass: batches of preprocessed subjects -> L2-normalised float16 embeddings.

Shared by the stage and by benchmarks/bench_embed.py, so that the bare-model baseline runs
exactly the same forward (same autocast, same normalisation) as the stage.
"""

from __future__ import annotations

import contextlib
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


def encode_batches(model: torch.nn.Module, batches: Iterable, device: torch.device, *,
                   on_device: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[EncodedBatch]:
    """Encode DataLoader batches (index, pixels, reason, detail) in order.

    ``on_device`` finishes the preprocessing on the device (the ``device`` half of
    flows.embed.preprocess.split_preprocess: uint8 -> normalised float).

    Results are fetched one batch late: batch i+1 is queued on the GPU before batch i is
    copied back, so the device never idles while the host waits for a copy.
    """
    pending = None
    for indices, pixels, reasons, details in batches:
        pixels = pixels.to(device, non_blocking=True)  # (B, 3, S, S)
        if on_device is not None:
            pixels = on_device(pixels)
        embeddings = encode_pixels(model, pixels)
        if pending is not None:
            yield _fetch(*pending)
        pending = (indices, embeddings, list(reasons), list(details))
    if pending is not None:
        yield _fetch(*pending)


def _fetch(indices: torch.Tensor, embeddings: torch.Tensor, reasons: list[str], details: list[str]) -> EncodedBatch:
    return EncodedBatch(indices.numpy().astype(np.int64), embeddings.cpu().numpy(), reasons, details)

"""Perceiver attention (Eq. 2) and the Q-former built from it.

PA(x, q) = Softmax(Q(q) K([x, q])^T / sqrt(d)) V([x, q]): the queries q attend to the features x
concatenated with themselves, as in IP-Adapter's Resampler and OpenFlamingo's PerceiverResampler.
The argument order is Eq. 2's: features first, queries second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class PerceiverAttention(nn.Module):
    """One PA block; the output has the queries' shape."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, zero_init_out: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        if zero_init_out:  # a new residual branch that starts as the identity
            nn.init.zeros_(self.to_out.weight)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) features, q: (B, M, dim) queries -> (B, M, dim)."""
        x, q = self.norm_x(x), self.norm_q(q)
        kv_input = torch.cat([x, q], dim=1)  # (B, N + M, dim)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)
        qh = rearrange(self.to_q(q), "b m (h d) -> b h m d", h=self.heads)
        kh = rearrange(k, "b n (h d) -> b h n d", h=self.heads)
        vh = rearrange(v, "b n (h d) -> b h n d", h=self.heads)
        out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, h, M, d)
        return self.to_out(rearrange(out, "b h m d -> b m (h d)"))


class FeedForward(nn.Sequential):
    def __init__(self, *, dim: int, mult: int):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class QFormer(nn.Module):
    """A stack of (PA + feed-forward) layers with residuals; queries come from the caller.

    ``input_dim`` is the width of the image features, projected to ``dim`` once; the
    result stays at ``dim`` (callers add their own output projection).
    """

    def __init__(self, *, input_dim: int, dim: int, depth: int, heads: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(input_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(dim=dim, heads=heads, dim_head=dim // heads), FeedForward(dim=dim, mult=ff_mult)]
            )
            for _ in range(depth)
        )

    def forward(self, features: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """features: (B, N, input_dim), queries: (B, M, dim) -> (B, M, dim)."""
        x = self.proj_in(features)  # (B, N, dim)
        q = queries
        for attn, ff in self.layers:
            q = q + attn(x, q)
            q = q + ff(q)
        return q


__all__ = ["FeedForward", "PerceiverAttention", "QFormer"]

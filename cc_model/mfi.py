"""The MFI encoder: visual Q-former, textual Q-former with spatio-temporal queries, TV fusion.

Shapes: f_I (B, K*T, D_img) concatenated CLIP hidden states; f_v (B, m[+1], D_cross) visual
tokens; f_t (B, l[+1], D_text) textual tokens in the text encoder's token-embedding space. The
trailing CLS token of each exists only when CSCL is on (the paper adds them for CSCL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from cc_model.config import ModelParams
from cc_model.perceiver import PerceiverAttention, QFormer


def _queries(n: int, dim: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n, dim) * dim**-0.5)  # Resampler's init


class VisualQFormer(nn.Module):
    """m (+1 CLS) learnable queries over f_I -> f_v."""

    def __init__(self, *, image_dim: int, dim: int, depth: int, heads: int, ff_mult: int, num_queries: int, output_dim: int):
        super().__init__()
        self.queries = _queries(num_queries, dim)
        self.qformer = QFormer(input_dim=image_dim, dim=dim, depth=depth, heads=heads, ff_mult=ff_mult)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, N, image_dim) -> (B, num_queries, output_dim)."""
        q = self.queries.unsqueeze(0).expand(image_features.shape[0], -1, -1)  # (B, Q, dim)
        return self.norm_out(self.proj_out(self.qformer(image_features, q)))


class SpatioTemporalQueries(nn.Module):
    """f_q^st: Fourier features of the timestep (through an MLP) plus one learnable embedding per
    UNet cross-attention layer (layer a in execution order), and one for the CLS token."""

    def __init__(self, *, num_queries: int, dim: int):
        super().__init__()
        self.dim = dim
        self.layer_embedding = _queries(num_queries, dim)  # (L, dim)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) diffusion timesteps -> (B, L, dim) queries."""
        fourier = get_timestep_embedding(timesteps, self.dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        time = self.time_mlp(fourier.to(self.layer_embedding.dtype))  # (B, dim)
        return self.layer_embedding.unsqueeze(0) + time.unsqueeze(1)  # (B, L, dim)


class TextualQFormer(nn.Module):
    """Spatio-temporal queries over f_I -> f_t in the text token-embedding space."""

    def __init__(self, *, image_dim: int, dim: int, depth: int, heads: int, ff_mult: int, num_queries: int, output_dim: int):
        super().__init__()
        self.queries = SpatioTemporalQueries(num_queries=num_queries, dim=dim)
        self.qformer = QFormer(input_dim=image_dim, dim=dim, depth=depth, heads=heads, ff_mult=ff_mult)
        # Norm first, linear last: token embeddings have a small, learnable scale.
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, output_dim)

    def forward(self, image_features: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, N, image_dim), (B,) -> (B, num_queries, output_dim)."""
        return self.proj_out(self.norm_out(self.qformer(image_features, self.queries(timesteps))))


class TVFusion(nn.Module):
    """f^_v = f_v + PA(f_t, f_v).

    Argument order follows Eq. 2 (features first, queries second), so the *visual* tokens are the
    queries and f^_v keeps m (+1) tokens; the paper's prose ("textual embeddings as queries")
    would give l (+1) tokens instead. The residual with a zero-initialised output projection is
    our addition: the fusion starts as the identity, so enabling it does not perturb f_v at step 0.
    """

    def __init__(self, *, text_dim: int, visual_dim: int, heads: int):
        super().__init__()
        heads = heads if visual_dim % heads == 0 else 1
        self.text_in = nn.Linear(text_dim, visual_dim) if text_dim != visual_dim else nn.Identity()
        self.attn = PerceiverAttention(dim=visual_dim, heads=heads, dim_head=visual_dim // heads, zero_init_out=True)

    def forward(self, f_t: torch.Tensor, f_v: torch.Tensor) -> torch.Tensor:
        """(B, l', D_text), (B, m', D_cross) -> (B, m', D_cross)."""
        return f_v + self.attn(self.text_in(f_t), f_v)


@dataclass
class MFIOutput:
    """What the MFI encoder gives the UNet and the losses for the reference images."""

    visual_tokens: torch.Tensor  # (B, m, D_cross) f^_v without CLS: keys/values of the visual branch
    visual_cls: torch.Tensor | None  # (B, D_cross) for CSCL
    splus: torch.Tensor | None  # (B, l, D_text) one token per cross-attention layer
    textual_cls: torch.Tensor | None  # (B, D_text) for CSCL


class MFIEncoder(nn.Module):
    """All trainable MFI parts; which exist depends on ``params.ablation``."""

    def __init__(
        self,
        *,
        params: ModelParams,
        image_dim: int,
        cross_attention_dim: int,
        text_dim: int,
        num_cross_attention_layers: int,
    ):
        super().__init__()
        mfi, ablation = params.mfi, params.ablation
        if mfi.dim is None or mfi.heads is None:
            raise ValueError("MFIEncoder needs resolved params (see resolve_model_params)")
        self.num_visual_tokens = mfi.num_visual_tokens
        self.num_layers = num_cross_attention_layers
        self.with_cls = ablation.cscl
        common = dict(image_dim=image_dim, dim=mfi.dim, depth=mfi.depth, heads=mfi.heads, ff_mult=mfi.ff_mult)
        self.visual_qformer = VisualQFormer(
            **common, num_queries=mfi.num_visual_tokens + self.with_cls, output_dim=cross_attention_dim
        )
        self.textual_qformer = (
            TextualQFormer(**common, num_queries=self.num_layers + self.with_cls, output_dim=text_dim)
            if ablation.textual_qformer
            else None
        )
        self.tv_fusion = (
            TVFusion(text_dim=text_dim, visual_dim=cross_attention_dim, heads=mfi.heads) if ablation.tv_fusion else None
        )

    def textual(self, image_features: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, N, D_img), (B,) -> f_t (B, l[+1], D_text)."""
        if self.textual_qformer is None:
            raise RuntimeError("the textual Q-former is disabled (model.ablation.textual_qformer)")
        return self.textual_qformer(image_features, timesteps)

    def forward(
        self, image_features: torch.Tensor, timesteps: torch.Tensor, f_t: torch.Tensor | None = None
    ) -> MFIOutput:
        """f_I of the references (B, N, D_img) and their timesteps (B,); ``f_t`` if already computed."""
        m, l = self.num_visual_tokens, self.num_layers
        f_v = self.visual_qformer(image_features)  # (B, m[+1], D_cross)
        if self.textual_qformer is not None and f_t is None:
            f_t = self.textual(image_features, timesteps)  # (B, l[+1], D_text)
        fused = self.tv_fusion(f_t, f_v) if self.tv_fusion is not None else f_v
        return MFIOutput(
            visual_tokens=fused[:, :m],
            visual_cls=f_v[:, m] if self.with_cls else None,
            splus=f_t[:, :l] if f_t is not None else None,
            textual_cls=f_t[:, l] if (f_t is not None and self.with_cls) else None,
        )


__all__ = ["MFIEncoder", "MFIOutput", "SpatioTemporalQueries", "TVFusion", "TextualQFormer", "VisualQFormer"]

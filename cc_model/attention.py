"""Decoupled cross-attention (Eq. 3) as a diffusers attention processor, with optional map capture.

    out = Softmax(Q K_t^T / sqrt(d)) V_t + gamma * Softmax(Q K_v^T / sqrt(d)) V_v

The attention *module* keeps its frozen to_q/to_k/to_v/to_out; the *processor* owns the algorithm
and the trainable visual projections under the unique prefix ``cc_visual_kv`` (initialised from the
layer's to_k/to_v as IP-Adapter does), so the trained UNet weights are exactly the parameters
whose name contains that prefix. Self-attention processors are left as they are.

Conditioning travels as ``encoder_hidden_states`` in the shape of a tuple, like diffusers' own
IP-Adapter (which passes ``(text, image)``): the UNet hands it to the cross-attention layers only,
so self-attention never sees it and no ``cross_attention_kwargs`` warnings fire. Each processor
knows its layer index a (execution order: down, mid, up) and picks its own text features.

Every layer computes its output with SDPA. Layers that the localisation loss reads (an
:class:`AttentionCapture` at their resolution) also compute the maps beside it, from Q and K
only: the placeholder's text probability via a logsumexp over the text keys, and the visual
probabilities via a softmax over the m visual keys, from one product of Q with both sets of
keys (:func:`layer_maps`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

TRAINABLE_PREFIX = "cc_visual_kv"

_CROSS_ATTN = re.compile(
    r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2\.processor$"
)
_EXECUTION_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}  # attn_processors lists down, up, mid


@dataclass
class CapturedMaps:
    """One cross-attention layer's head-averaged attention probabilities, as spatial maps."""

    layer_index: int  # a, in execution order
    height: int  # the layer's query grid
    width: int
    text: torch.Tensor | None  # (B, h, w) probability of the placeholder token (averaged over its occurrences)
    visual: torch.Tensor | None  # (B, m, h, w) probability of each visual token


def normalise_map(maps: torch.Tensor) -> torch.Tensor:
    """Divide each spatial map by its maximum, so maps lie in [0, 1] like the mask. Applied to each
    visual token's map before averaging: the m maps themselves would average to the constant 1/m
    (each query's probabilities sum to 1 over the m tokens)."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)


def placeholder_weights(input_ids: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """(B, S) ids -> (B, S) weights selecting the placeholder: 1/count at each occurrence, 0 elsewhere."""
    weights = (input_ids == placeholder_id).float()
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)


class AttentionCapture:
    """Collects the maps the localisation loss needs, only in layers at or below a resolution.

    ``placeholder_weights`` (B, S) selects the placeholder token(s) in each caption: 1/count at
    each occurrence, 0 elsewhere. Keyed by layer, so a recomputation (gradient checkpointing)
    overwrites rather than duplicates.
    """

    def __init__(self, *, placeholder_weights: torch.Tensor, latent_size: tuple[int, int], min_downsample: int = 1,
                 most_occurrences: int | None = None):
        """``most_occurrences``: the most placeholder tokens in one caption, if the caller knows it
        from host memory; otherwise it is read back from the device once (a sync)."""
        self.placeholder_weights = placeholder_weights
        self.latent_size = latent_size
        self.min_downsample = min_downsample
        self.most_occurrences = most_occurrences
        self._maps: dict[int, CapturedMaps] = {}
        self._columns: tuple[torch.Tensor, torch.Tensor] | None = None

    def layer_grid(self, num_queries: int) -> tuple[tuple[int, int], int] | None:
        """((h, w), downsampling factor) of a layer with this many queries; None if it is no grid of the latent."""
        lh, lw = self.latent_size
        factor = round(math.sqrt(lh * lw / num_queries))
        if factor < 1 or (lh // factor) * (lw // factor) != num_queries:
            return None
        return (lh // factor, lw // factor), factor

    def grid(self, num_queries: int) -> tuple[int, int] | None:
        """(h, w) of a layer with this many queries if it is captured, else None."""
        found = self.layer_grid(num_queries)
        if found is None or found[1] < self.min_downsample:
            return None
        return found[0]

    def placeholder_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, weight), each (B, J): the placeholder's positions and weights, J = most occurrences.

        Computed once per capture, shared by every captured layer; J is read back from the device
        (a sync) unless given as ``most_occurrences``. Rows without the placeholder get weight 0,
        hence an all-zero text map.
        """
        if self._columns is None:
            weights = self.placeholder_weights
            most = self.most_occurrences or max(1, int((weights != 0).sum(dim=1).max()))
            weight, index = weights.topk(most, dim=1)
            self._columns = index, weight
        return self._columns

    def record(self, maps: CapturedMaps) -> None:
        self._maps[maps.layer_index] = maps

    @property
    def maps(self) -> list[CapturedMaps]:
        return [self._maps[a] for a in sorted(self._maps)]


class SubjectLocation(AttentionCapture):
    """Timestep-specific subject location, at inference (DESIGN.md section 2).

    ``mask`` (B, H, W) in [0, 1] at the latent size is the subject location found at the previous
    denoising step (None at the first step). Every cross-attention layer scales, per query
    position, the visual attention probabilities and the placeholder's text attention
    probability by the mask resized to its grid (nearest), so the subject's tokens only act
    inside the subject; the text probabilities are not renormalised. As an AttentionCapture it
    records the layers' *unmasked* maps (layers at or below ``min_downsample``), from which
    :meth:`next_mask` forms this step's A_g for the next step: the region can grow as well as shrink.
    """

    def __init__(self, *, placeholder_weights: torch.Tensor, latent_size: tuple[int, int], min_downsample: int = 1,
                 mask: torch.Tensor | None = None):
        super().__init__(placeholder_weights=placeholder_weights, latent_size=latent_size,
                         min_downsample=min_downsample)
        self.mask = mask
        self._keep: dict[tuple[int, int], torch.Tensor] = {}

    def keep(self, num_queries: int) -> torch.Tensor | None:
        """(B, N) the mask at a layer's grid, flattened like its queries; None when there is no mask."""
        if self.mask is None:
            return None
        found = self.layer_grid(num_queries)
        if found is None:
            raise ValueError(f"a cross-attention layer with {num_queries} queries is no grid of {self.latent_size}")
        h, w = found[0]
        if (h, w) not in self._keep:
            resized = F.interpolate(self.mask[:, None].float(), size=(h, w), mode="nearest")
            self._keep[h, w] = resized.reshape(self.mask.shape[0], h * w)
        return self._keep[h, w]

    def average_map(self) -> torch.Tensor:
        """A_g (B, H, W) at the latent size, as the localisation loss forms it: per layer, the visual map
        (the mean of its m max-normalised token maps) and the max-normalised placeholder map; all
        resized bilinearly, averaged, then max-normalised."""
        maps = []
        for layer in self.maps:
            for part in (normalise_map(layer.visual.float()).mean(dim=1) if layer.visual is not None else None,
                         normalise_map(layer.text.float()) if layer.text is not None else None):
                if part is not None:
                    maps.append(F.interpolate(part[:, None], size=self.latent_size, mode="bilinear",
                                              align_corners=False)[:, 0])
        if not maps:
            raise ValueError("subject location: no attention maps recorded (check model.loc_min_downsample)")
        a_g = torch.stack(maps).mean(dim=0)
        return a_g / a_g.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)

    def next_mask(self, threshold: float) -> torch.Tensor:
        """The binary (B, H, W) location for the next step: A_g, rescaled to [0, 1] between its minimum
        and maximum, at or above ``threshold``; all ones where A_g is flat (no location to confine to).

        The rescaling matters: each query's visual probabilities sum to 1 over the m tokens, so the
        visual maps add a nearly constant share to A_g, and a threshold on max-normalised A_g alone
        would pass everywhere.
        """
        a_g = self.average_map()
        low = a_g.amin(dim=(-2, -1), keepdim=True)
        span = a_g.amax(dim=(-2, -1), keepdim=True) - low
        scaled = torch.where(span > 1e-6, (a_g - low) / span.clamp_min(1e-6), torch.ones_like(a_g))
        return (scaled >= threshold).float()


class DecoupledConditioning(NamedTuple):
    """What the cross-attention layers receive as ``encoder_hidden_states``."""

    # (B, l, S, D_text) one text encoding per layer, or the l (B, S, D_text) tensors of it
    # (training: taken apart once, so its gradient is put together once, not once per layer),
    # or (B, S, D_text) shared by every layer
    text: torch.Tensor | tuple[torch.Tensor, ...]
    visual: torch.Tensor | None = None  # (B, m, D_cross) visual tokens f^_v; None: text only
    capture: AttentionCapture | None = None  # collect maps for the localisation loss
    location: SubjectLocation | None = None  # inference: mask the subject's attention, record maps for the next step


class VisualKV(nn.Module):
    """W_k^v, W_v^v of one layer."""

    def __init__(self, to_k: nn.Linear, to_v: nn.Linear):
        super().__init__()
        self.to_k = nn.Linear(to_k.in_features, to_k.out_features, bias=to_k.bias is not None)
        self.to_v = nn.Linear(to_v.in_features, to_v.out_features, bias=to_v.bias is not None)
        with torch.no_grad():  # IP-Adapter's init: start from the text projections
            self.to_k.load_state_dict(to_k.state_dict())
            self.to_v.load_state_dict(to_v.state_dict())
        self.to(device=to_k.weight.device, dtype=to_k.weight.dtype)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, h, N, d)


def attention_probabilities(query, key, scale, mask=None) -> torch.Tensor:
    """softmax(Q K^T * scale [+ mask]) in float32, (B, h, N, S): what SDPA computes but never returns."""
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


def placeholder_probability(query, key, scale, index, weight, mask=None) -> torch.Tensor:
    """The placeholder's text attention probability, averaged over heads: (B, N) in float32.

    query (B, h, N, d), key (B, h, S, d); index/weight (B, J): the placeholder's positions in each
    caption and their weights (AttentionCapture.placeholder_columns). Equal to
    ``(softmax(Q K^T * scale) @ w).mean(heads)`` but only a logsumexp over S and J columns are
    formed: no softmax over S, and no probabilities @ V (SDPA made the layer's output).
    """
    return layer_maps(query, key, scale, index, weight, mask)[0]


def layer_maps(query, key, scale, index, weight, mask=None, visual_key=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One captured layer's maps from one product of Q with its text and visual keys together.

    Returns the placeholder's text probability (B, N) (:func:`placeholder_probability`) and, with
    ``visual_key`` (B, h, m, d), the head-averaged softmax over the m visual keys (B, N, m), both
    float32. ``mask`` applies to the text keys only. Q is laid out for the product once, not
    once per map, and its gradient comes back from one product.
    """
    keys = key if visual_key is None else torch.cat([key, visual_key], dim=2)  # (B, h, S [+ m], d)
    scores = torch.matmul(query, keys.transpose(-1, -2)).float() * scale  # (B, h, N, S [+ m])
    # split, not two slices: its backward joins the two gradients into one tensor, where each
    # slice's backward would fill a zero tensor of the whole scores' size
    text, visual = scores.split([key.shape[2], scores.shape[-1] - key.shape[2]], dim=-1)
    if mask is not None:
        text = text + mask
    lse = text.logsumexp(dim=-1, keepdim=True)  # (B, h, N, 1)
    picked = text.gather(-1, index[:, None, None, :].expand(-1, text.shape[1], text.shape[2], -1))  # (B, h, N, J)
    probs = (picked - lse).exp()
    text_map = (probs * weight[:, None, None, :].float()).sum(dim=-1).mean(dim=1)
    visual_map = None if visual_key is None else visual.softmax(dim=-1).mean(dim=1)
    return text_map, visual_map


class DecoupledCrossAttnProcessor(nn.Module):
    """Processor for one cross-attention layer; a plain tensor conditioning behaves like AttnProcessor2_0."""

    def __init__(self, *, layer_index: int, to_k: nn.Linear, to_v: nn.Linear, gamma: float = 1.0):
        super().__init__()
        self.layer_index = layer_index
        self.gamma = gamma
        self.cc_visual_kv = VisualKV(to_k, to_v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        cond = encoder_hidden_states
        if not isinstance(cond, DecoupledConditioning):
            if cond is None:
                raise ValueError("DecoupledCrossAttnProcessor is for cross-attention layers only")
            cond = DecoupledConditioning(text=cond)
        text = cond.text
        if isinstance(text, tuple):  # one tensor per layer
            text = text[self.layer_index]
        elif text.ndim == 4:
            text = text[:, self.layer_index]  # (B, S, D_text)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # (B, N, C)
        batch, num_queries, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)

        query = _heads(attn.to_q(hidden_states), attn.heads)  # (B, h, N, d)
        key = _heads(attn.to_k(text), attn.heads)  # (B, h, S, d)
        value = _heads(attn.to_v(text), attn.heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        capture = cond.capture if cond.capture is not None else cond.location
        grid = capture.grid(num_queries) if capture is not None else None
        keep = cond.location.keep(num_queries) if cond.location is not None else None  # (B, N) or None
        if keep is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)  # (B, h, N, d)
        else:  # subject location: the placeholder's probability scaled by the mask, explicitly
            probs = attention_probabilities(query, key, attn.scale, attention_mask)  # (B, h, N, S)
            index, weight = cond.location.placeholder_columns()
            placeholder = torch.zeros_like(cond.location.placeholder_weights, dtype=probs.dtype)
            placeholder.scatter_(1, index, (weight != 0).to(probs.dtype))  # (B, S) 1 at the placeholder
            factor = 1 - placeholder[:, None, None, :] * (1 - keep[:, None, :, None].to(probs.dtype))
            out = torch.matmul((probs * factor).to(value.dtype), value)
        v_key = None
        if cond.visual is not None and (self.gamma != 0 or grid is not None):
            v_key = _heads(self.cc_visual_kv.to_k(cond.visual), attn.heads)  # (B, h, m, d)
            if self.gamma != 0:
                v_value = _heads(self.cc_visual_kv.to_v(cond.visual), attn.heads)
                if keep is None:
                    out = out + self.gamma * F.scaled_dot_product_attention(query, v_key, v_value)
                else:  # the visual tokens act only inside the subject
                    v_probs = attention_probabilities(query, v_key, attn.scale) * keep[:, None, :, None]
                    out = out + self.gamma * torch.matmul(v_probs.to(v_value.dtype), v_value)
        if grid is not None:  # maps for the localisation loss, beside (not instead of) the fused kernels
            index, weight = capture.placeholder_columns()
            text_map, visual_map = layer_maps(query, key, attn.scale, index, weight, attention_mask,
                                              visual_key=v_key)  # (B, N), (B, N, m) or None

        if grid is not None:
            h, w = grid
            capture.record(
                CapturedMaps(
                    layer_index=self.layer_index,
                    height=h,
                    width=w,
                    text=text_map.view(batch, h, w),
                    visual=None if visual_map is None else visual_map.transpose(1, 2).reshape(batch, -1, h, w),
                )
            )

        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layer_names(unet) -> list[str]:
    """Processor names of the cross-attention layers in execution order (down, mid, up).

    ``unet.attn_processors`` lists them down, up, mid (module registration order); the UNet
    runs down, mid, up, and the S+ token of layer a must condition the a-th layer that runs.
    """
    names = []
    for name in unet.attn_processors:
        module = unet.get_submodule(name.removesuffix(".processor"))
        if not getattr(module, "is_cross_attention", False):
            continue
        if not _CROSS_ATTN.match(name):
            raise ValueError(f"unexpected cross-attention layer name {name!r}; cannot order it")
        names.append(name)

    def order(name: str) -> tuple[int, ...]:
        kind, block, attention, transformer = _CROSS_ATTN.match(name).groups()
        return _EXECUTION_ORDER[kind], int(block or 0), int(attention), int(transformer)

    return sorted(names, key=order)


def install_decoupled_attention(unet, *, gamma: float = 1.0) -> list[str]:
    """Give every cross-attention layer a DecoupledCrossAttnProcessor; returns their names, a = 0..l-1."""
    names = cross_attention_layer_names(unet)
    processors = dict(unet.attn_processors)  # self-attention processors kept as they are
    for index, name in enumerate(names):
        module = unet.get_submodule(name.removesuffix(".processor"))
        processors[name] = DecoupledCrossAttnProcessor(layer_index=index, to_k=module.to_k, to_v=module.to_v, gamma=gamma)
    unet.set_attn_processor(processors)
    for name in names:  # the backbone is frozen; only the visual projections train
        unet.get_submodule(name).requires_grad_(True)
    return names


def set_gamma(unet, gamma: float) -> None:
    for processor in unet.attn_processors.values():
        if isinstance(processor, DecoupledCrossAttnProcessor):
            processor.gamma = gamma


__all__ = [
    "TRAINABLE_PREFIX",
    "AttentionCapture",
    "CapturedMaps",
    "DecoupledConditioning",
    "DecoupledCrossAttnProcessor",
    "SubjectLocation",
    "attention_probabilities",
    "cross_attention_layer_names",
    "install_decoupled_attention",
    "normalise_map",
    "placeholder_weights",
    "layer_maps",
    "placeholder_probability",
    "set_gamma",
]

"""S+ injection: each cross-attention layer gets the caption encoded with its own placeholder token.

For a batch of B captions and l per-layer tokens s+_a, the frozen text encoder runs once on B*l
sequences: row a*B + b is caption b with the placeholder's input embedding replaced by s+_{b,a}.
The replacement is a temporary forward hook on the encoder's input-embedding table, so the rest
of the encoder (positions, causal mask, final norm) is transformers' own public forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


def placeholder_token_id(tokenizer, placeholder: str) -> int:
    """The id of the placeholder word, which must be a single BPE token (e.g. 'sks')."""
    ids = tokenizer(placeholder, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"model.placeholder_token: {placeholder!r} tokenizes to {len(ids)} tokens; pick a one-token word")
    return ids[0]


def tokenize_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (B, T) ids padded (and cut) to the tokenizer's length, the text encoder's."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@contextmanager
def _replace_embeddings(embedding: nn.Embedding, input_ids: torch.Tensor, placeholder_id: int, tokens: torch.Tensor):
    """While active, the embedding of ``placeholder_id`` in row r of ``input_ids`` becomes tokens[r]."""
    where = (input_ids == placeholder_id).unsqueeze(-1)  # (R, S, 1)

    def hook(module, args, output):  # output: (R, S, D)
        return torch.where(where, tokens.unsqueeze(1).to(output.dtype), output)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SPlusTextEncoder:
    """The frozen CLIP text encoder, in the ordinary and the per-layer (S+) form."""

    def __init__(self, *, text_encoder, placeholder_id: int):
        self.text_encoder = text_encoder
        self.placeholder_id = placeholder_id

    def placeholder_embedding(self) -> torch.Tensor:
        """(D,) the placeholder word's ordinary input embedding."""
        return self.text_encoder.get_input_embeddings().weight[self.placeholder_id]

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) -> (B, S, D) the ordinary text path (last hidden state, as SD uses)."""
        return self.text_encoder(input_ids=input_ids).last_hidden_state

    def encode_per_layer(self, input_ids: torch.Tensor, splus: torch.Tensor, *, plain: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids and (B, l, D) S+ tokens -> (B, l, S, D), one batched call of B*l sequences.

        The result is laid out layer-major (a (l, B, S, D) buffer seen as (B, l, S, D)), so that
        layer a's features ``[:, a]`` are one contiguous block: its to_k/to_v run as one plain
        matrix product (a strided slice that needs a gradient would make them batched products
        over an expanded weight).

        Rows without the placeholder (e.g. a dropped caption) come out as the ordinary encoding.
        ``plain`` (B,) bool marks rows known to need no S+ (conditioning dropout: the caption was
        dropped, or the S+ tokens were reset to the ordinary embedding): they are encoded once,
        without gradient, and repeated over the l layers, the same values at 1/l of the cost.
        Pass it in host memory: on the device it is read back (a sync).
        """
        layers = splus.shape[1]
        plain = None if plain is None else plain.cpu()  # host memory: no device sync (CustomContrastModel)
        if plain is None or not bool(plain.any()):
            return self._per_layer(input_ids, splus).transpose(0, 1)
        keep, skip = ((~plain).nonzero().squeeze(1).to(input_ids.device, non_blocking=True),
                      plain.nonzero().squeeze(1).to(input_ids.device, non_blocking=True))
        with torch.no_grad():
            shared = self.encode(input_ids[skip])  # (B_plain, S, D)
        parts = [shared[None].expand(layers, -1, -1, -1)]  # (l, B_plain, S, D)
        if len(keep):
            parts.insert(0, self._per_layer(input_ids[keep], splus[keep]))
        order = torch.cat([keep, skip]).argsort()  # back to the batch's row order
        return torch.cat(parts, dim=1)[:, order].transpose(0, 1)

    def _per_layer(self, input_ids: torch.Tensor, splus: torch.Tensor) -> torch.Tensor:
        """(B, S) ids, (B, l, D) tokens -> (l, B, S, D): the B*l sequences in layer-major order."""
        batch, layers, dim = splus.shape
        ids = input_ids.repeat(layers, 1)  # (l*B, S), row a*B + b
        tokens = splus.transpose(0, 1).reshape(layers * batch, dim)  # (l*B, D), same row order
        with _replace_embeddings(self.text_encoder.get_input_embeddings(), ids, self.placeholder_id, tokens):
            hidden = self.text_encoder(input_ids=ids).last_hidden_state  # (l*B, S, D)
        return hidden.view(layers, batch, *hidden.shape[1:])


__all__ = ["SPlusTextEncoder", "placeholder_token_id", "tokenize_captions"]

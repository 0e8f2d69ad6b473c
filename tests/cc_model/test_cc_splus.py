"""S+ injection: one batched B*l text-encoder call, placeholder replaced per layer."""

from __future__ import annotations

import pytest
import torch

from cc_model.splus import SPlusTextEncoder, placeholder_token_id


@pytest.fixture
def encoder(tiny_backbones):
    pid = placeholder_token_id(tiny_backbones.tokenizer, "sks")
    return SPlusTextEncoder(text_encoder=tiny_backbones.text_encoder, placeholder_id=pid), tiny_backbones.tokenizer


def ids_of(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids


def test_ordinary_embedding_tokens_reproduce_the_ordinary_text_path(encoder):
    enc, tok = encoder
    ids = ids_of(tok, ["a photo of sks dog", "sks on a beach, sks again"])
    layers = 5
    splus = enc.placeholder_embedding().detach().expand(2, layers, -1)
    with torch.no_grad():
        per_layer = enc.encode_per_layer(ids, splus)
        ordinary = enc.encode(ids)
    assert per_layer.shape == (2, layers, 77, 32)
    for a in range(layers):
        torch.testing.assert_close(per_layer[:, a], ordinary, rtol=1e-5, atol=1e-5)


def test_batched_call_equals_a_loop_over_layers_and_is_one_call(encoder):
    enc, tok = encoder
    ids = ids_of(tok, ["a sks cup", "a red sks"])
    splus = torch.randn(2, 3, 32)
    calls = []
    handle = enc.text_encoder.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape), with_kwargs=True)
    with torch.no_grad():
        batched = enc.encode_per_layer(ids, splus)
    handle.remove()
    assert calls == [torch.Size([6, 77])]  # B*l sequences in one call
    with torch.no_grad():
        for a in range(3):
            torch.testing.assert_close(batched[:, a], enc.encode_per_layer(ids, splus[:, a : a + 1])[:, 0])


def test_token_replaces_the_placeholder_only(encoder):
    enc, tok = encoder
    ids = ids_of(tok, ["a photo of sks dog"])
    position = int((ids[0] == enc.placeholder_id).nonzero()[0])
    with torch.no_grad():
        out = enc.encode_per_layer(ids, torch.randn(1, 2, 32) * 3)
        ordinary = enc.encode(ids)
    # causal text encoder: positions before the placeholder are unchanged, from it on they differ
    torch.testing.assert_close(out[0, 0, :position], ordinary[0, :position])
    assert not torch.allclose(out[0, 0, position], ordinary[0, position])
    assert not torch.allclose(out[0, 0, position:], out[0, 1, position:])


def test_caption_without_placeholder_is_encoded_ordinarily(encoder):
    enc, tok = encoder
    ids = ids_of(tok, [""])
    with torch.no_grad():
        out = enc.encode_per_layer(ids, torch.randn(1, 2, 32))
        torch.testing.assert_close(out[0, 1], enc.encode(ids)[0])


def test_gradients_reach_the_splus_tokens(encoder):
    enc, tok = encoder
    splus = torch.randn(1, 2, 32, requires_grad=True)
    enc.encode_per_layer(ids_of(tok, ["a sks"]), splus).sum().backward()
    assert splus.grad is not None and splus.grad.abs().sum() > 0


def test_multi_token_placeholder_rejected(tiny_backbones):
    with pytest.raises(ValueError, match="one-token word"):
        placeholder_token_id(tiny_backbones.tokenizer, "sks dog")


@pytest.mark.parametrize("plain_rows", [[True, False, True], [False, False, True], [False, False, False]])
def test_plain_rows_are_encoded_once_with_the_same_values_and_gradients(encoder, plain_rows):
    """Rows marked plain (dropped image/caption) skip the B*l call; values and other rows' gradients unchanged."""
    enc, tok = encoder
    ids = ids_of(tok, ["a photo of sks dog", "a sks cup", ""])
    layers = 4
    splus = torch.randn(3, layers, 32)
    splus[0] = enc.placeholder_embedding().detach()  # a dropped image: S+ reset to the ordinary embedding
    # row 2 is a dropped caption (no placeholder); row 1 needs its S+ tokens and is never plain
    plain = torch.tensor(plain_rows)
    calls = []
    handle = enc.text_encoder.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    results = []
    for mask in (None, plain):
        tokens = splus.clone().requires_grad_(True)
        out = enc.encode_per_layer(ids, tokens, plain=mask)
        assert out.shape == (3, layers, 77, 32) and all(out[:, a].is_contiguous() for a in range(layers))
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), tokens.grad))
    handle.remove()
    kept = plain_rows.count(False)
    assert sorted(calls[1:]) == sorted(n for n in (kept * layers, 3 - kept) if n)  # S+ rows once per layer, plain once
    (full, grad_full), (fast, grad_fast) = results
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # the model never lets gradient reach the S+ tokens of plain rows (they were replaced or unused)
    assert torch.all(grad_fast[plain] == 0)
    torch.testing.assert_close(grad_fast[~plain], grad_full[~plain], rtol=1e-4, atol=1e-6)

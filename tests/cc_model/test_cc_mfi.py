"""Perceiver attention against Eq. 2 written out; Q-former and MFI shapes; TV fusion argument order."""

from __future__ import annotations

import math

import torch

from cc_model.mfi import MFIEncoder, SpatioTemporalQueries, TVFusion
from cc_model.perceiver import PerceiverAttention, QFormer


def test_perceiver_attention_is_eq2():
    pa = PerceiverAttention(dim=8, heads=2, dim_head=4)
    x, q = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    got = pa(x, q)
    xn, qn = pa.norm_x(x), pa.norm_q(q)
    kv_in = torch.cat([xn, qn], dim=1)  # [f_I, f_q]
    Q, (K, V) = pa.to_q(qn), pa.to_kv(kv_in).chunk(2, dim=-1)
    expected = torch.zeros(2, 3, 8)
    for b in range(2):
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            weights = torch.softmax(Q[b, :, s] @ K[b, :, s].T / math.sqrt(4), dim=-1)  # (3, 8)
            heads.append(weights @ V[b, :, s])
        expected[b] = pa.to_out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_qformer_keeps_query_count():
    qf = QFormer(input_dim=12, dim=8, depth=4, heads=2, ff_mult=2)
    assert len(qf.layers) == 4
    assert qf(torch.randn(3, 7, 12), torch.randn(3, 5, 8)).shape == (3, 5, 8)


def test_spatio_temporal_queries_depend_on_layer_and_timestep():
    queries = SpatioTemporalQueries(num_queries=5, dim=8)
    out = queries(torch.tensor([0, 999]))
    assert out.shape == (2, 5, 8)
    assert not torch.allclose(out[0], out[1])  # timestep
    assert not torch.allclose(out[0, 0], out[0, 1])  # layer


def test_tv_fusion_queries_are_the_visual_tokens_and_start_as_identity():
    fusion = TVFusion(text_dim=8, visual_dim=8, heads=2)
    f_t, f_v = torch.randn(2, 6, 8), torch.randn(2, 3, 8)
    out = fusion(f_t, f_v)
    assert out.shape == f_v.shape  # Eq. 2 order: PA(f_t, f_v) keeps the m(+1) visual tokens
    torch.testing.assert_close(out, f_v)  # zero-initialised residual branch
    torch.nn.init.normal_(fusion.attn.to_out.weight)
    assert not torch.allclose(fusion(f_t, f_v), f_v)
    assert not torch.allclose(fusion(f_t * 2, f_v), fusion(f_t, f_v))  # depends on the text tokens


def test_mfi_encoder_outputs(make_params):
    from cc_model.config import resolve_model_params

    params = resolve_model_params(make_params(), cross_attention_dim=16, image_num_hidden_layers=4)
    mfi = MFIEncoder(params=params, image_dim=24, cross_attention_dim=16, text_dim=16, num_cross_attention_layers=5)
    m = params.mfi.num_visual_tokens
    out = mfi(torch.randn(3, 30, 24), torch.tensor([1, 500, 999]))
    assert out.visual_tokens.shape == (3, m, 16)
    assert out.visual_cls.shape == (3, 16) and out.textual_cls.shape == (3, 16)
    assert out.splus.shape == (3, 5, 16)

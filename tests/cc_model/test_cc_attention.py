"""Decoupled cross-attention: layer order, equivalence with the plain UNet, per-layer text, capture."""

from __future__ import annotations

import copy

import pytest
import torch

from cc_model.attention import (
    AttentionCapture,
    DecoupledConditioning,
    DecoupledCrossAttnProcessor,
    attention_probabilities,
    cross_attention_layer_names,
    install_decoupled_attention,
    layer_maps,
    placeholder_probability,
)

B, T, D = 2, 77, 32


def inputs(unet):
    c, s = unet.config.in_channels, unet.config.sample_size
    return torch.randn(B, c, s, s), torch.tensor([10, 900])


@pytest.fixture
def unets(tiny_backbones):
    plain = copy.deepcopy(tiny_backbones.unet)
    unet = tiny_backbones.unet
    self_before = {k: v for k, v in unet.attn_processors.items() if "attn1" in k}
    names = install_decoupled_attention(unet, gamma=0.0)
    return plain, unet, names, self_before


def test_layer_indices_follow_execution_order(unets):
    _, unet, names, _ = unets
    assert [n.split(".")[0] for n in names] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    called = []
    for name in names:
        module = unet.get_submodule(name.removesuffix(".processor"))
        module.register_forward_pre_hook(lambda m, args, kw=None: called.append(m.processor.layer_index))
    latents, t = inputs(unet)
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=torch.randn(B, T, D))
    assert called == list(range(len(names)))
    assert [unet.attn_processors[n].layer_index for n in names] == list(range(len(names)))
    # attn_processors itself lists up before mid: the order had to be computed
    listed = [n for n in unet.attn_processors if n in names]
    assert listed != names


def test_self_attention_untouched_and_visual_kv_initialised_from_layer(unets):
    _, unet, names, self_before = unets
    for name, proc in self_before.items():
        assert unet.attn_processors[name] is proc
    for name in names:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        kv = attn.processor.cc_visual_kv
        assert torch.equal(kv.to_k.weight, attn.to_k.weight) and torch.equal(kv.to_v.weight, attn.to_v.weight)
        assert kv.to_k.weight.data_ptr() != attn.to_k.weight.data_ptr()


@pytest.mark.parametrize("capture", [False, True])
def test_gamma_zero_equals_plain_unet(unets, capture):
    plain, unet, names, _ = unets
    latents, t = inputs(unet)
    text = torch.randn(B, T, D)
    cap = None
    if capture:  # the explicit-softmax path must agree with SDPA too
        cap = AttentionCapture(placeholder_weights=torch.eye(T)[:B], latent_size=latents.shape[-2:])
    with torch.no_grad():
        expected = plain(latents, t, encoder_hidden_states=text).sample
        per_layer = text.unsqueeze(1).expand(B, len(names), T, D)
        cond = DecoupledConditioning(text=per_layer, visual=torch.randn(B, 4, D), capture=cap)
        got = unet(latents, t, encoder_hidden_states=cond).sample
        got_plain_tensor = unet(latents, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_plain_tensor, expected, rtol=1e-5, atol=1e-5)
    if capture:
        assert [m.layer_index for m in cap.maps] == list(range(len(names)))


def test_nonzero_gamma_changes_output_and_zero_visual_tokens_do_not(unets):
    plain, unet, names, _ = unets
    latents, t = inputs(unet)
    text = torch.randn(B, T, D)
    for name in names:
        unet.attn_processors[name].gamma = 1.0
    with torch.no_grad():
        base = plain(latents, t, encoder_hidden_states=text).sample
        with_image = unet(latents, t, encoder_hidden_states=DecoupledConditioning(text, torch.randn(B, 4, D))).sample
        zero_image = unet(latents, t, encoder_hidden_states=DecoupledConditioning(text, torch.zeros(B, 4, D))).sample
    assert not torch.allclose(with_image, base, atol=1e-4)
    torch.testing.assert_close(zero_image, base, rtol=1e-5, atol=1e-5)  # bias-free K/V: exact no-op


def test_each_layer_receives_its_own_text(unets):
    _, unet, names, _ = unets
    latents, t = inputs(unet)
    per_layer = torch.randn(B, len(names), T, D)
    seen = {}
    for name in names:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        index = attn.processor.layer_index
        attn.to_k.register_forward_hook(lambda m, args, out, i=index: seen.__setitem__(i, args[0]))
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=DecoupledConditioning(text=per_layer))
    for a in range(len(names)):
        torch.testing.assert_close(seen[a], per_layer[:, a])


def test_captured_maps_are_the_explicit_probabilities(unets):
    _, unet, names, _ = unets
    latents, t = inputs(unet)
    text, visual = torch.randn(B, T, D), torch.randn(B, 4, D)
    name = names[0]
    attn = unet.get_submodule(name.removesuffix(".processor"))
    attn.processor.gamma = 1.0
    grabbed = {}
    attn.register_forward_pre_hook(lambda m, args: grabbed.__setitem__("h", args[0]))
    weights = torch.zeros(B, T)
    weights[:, 5] = 1.0
    cap = AttentionCapture(placeholder_weights=weights, latent_size=latents.shape[-2:])
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=DecoupledConditioning(text, visual, cap))
        hidden = grabbed["h"]  # (B, N, C)
        heads = attn.heads

        def probs(keys):
            q = attn.to_q(hidden).view(B, -1, heads, hidden.shape[-1] // heads).transpose(1, 2)
            k = keys.view(B, -1, heads, keys.shape[-1] // heads).transpose(1, 2)
            return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)  # (B, N, S)

        text_probs = probs(attn.to_k(text))[..., 5]
        visual_probs = probs(attn.processor.cc_visual_kv.to_k(visual))
    maps = cap.maps[0]
    side = latents.shape[-1]
    assert (maps.height, maps.width) == (side, side) and maps.visual.shape == (B, 4, side, side)
    torch.testing.assert_close(maps.text.reshape(B, -1), text_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.visual.flatten(2).transpose(1, 2), visual_probs, rtol=1e-5, atol=1e-6)


def test_capture_only_in_layers_at_or_below_the_resolution():
    cap = AttentionCapture(placeholder_weights=torch.ones(1, 3), latent_size=(64, 64), min_downsample=2)
    assert cap.grid(64 * 64) is None
    assert cap.grid(32 * 32) == (32, 32)
    assert cap.grid(8 * 8) == (8, 8)


def test_processors_are_the_only_new_trainable_unet_weights(unets):
    _, unet, _, _ = unets
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".processor.cc_visual_kv." in n for n in trainable)
    assert all(isinstance(p, DecoupledCrossAttnProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)
    assert len(cross_attention_layer_names(unet)) == 4


def test_placeholder_probability_equals_softmax_column_with_gradients():
    """The logsumexp form equals the weighted softmax columns, values and gradients, mask included."""
    torch.manual_seed(0)
    b, h, n, s, d = 3, 2, 6, 9, 4
    query = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
    weights = torch.zeros(b, s, dtype=torch.float64)
    weights[0, 2] = 1.0  # one occurrence
    weights[1, [3, 7]] = 0.5  # two occurrences
    # row 2: no placeholder (a dropped caption) -> an all-zero map
    mask = torch.zeros(b, h, 1, s)
    mask[..., -1] = -1e4  # e.g. a masked-out padding position
    cap = AttentionCapture(placeholder_weights=weights, latent_size=(n, 1))
    index, weight = cap.placeholder_columns()
    assert index.shape == (b, 2)
    got = placeholder_probability(query, key, 0.5, index, weight, mask)
    reference = (attention_probabilities(query, key, 0.5, mask).double() @ weights[:, None, :, None]).squeeze(-1).mean(1)
    torch.testing.assert_close(got, reference.float(), rtol=1e-6, atol=1e-7)
    assert torch.all(got[2] == 0)
    upstream = torch.randn(b, n, dtype=torch.float32)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key))
    expected = torch.autograd.grad((reference.float() * upstream).sum(), (query, key))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_layer_maps_from_one_product_equal_the_separate_softmaxes():
    torch.manual_seed(1)
    b, h, n, s, m, d = 2, 2, 6, 9, 3, 4
    query = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    key = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
    v_key = torch.randn(b, h, m, d, dtype=torch.float64, requires_grad=True)
    weights = torch.zeros(b, s, dtype=torch.float64)
    weights[0, 2], weights[1, 5] = 1.0, 1.0
    index, weight = AttentionCapture(placeholder_weights=weights, latent_size=(n, 1)).placeholder_columns()
    text, visual = layer_maps(query, key, 0.5, index, weight, visual_key=v_key)
    expected_text = placeholder_probability(query, key, 0.5, index, weight)
    expected_visual = attention_probabilities(query, v_key, 0.5).mean(dim=1)  # (B, N, m)
    torch.testing.assert_close(text, expected_text)
    torch.testing.assert_close(visual, expected_visual)
    up_t, up_v = torch.randn(b, n), torch.randn(b, n, m)
    grads = torch.autograd.grad((text * up_t).sum() + (visual * up_v).sum(), (query, key, v_key))
    expected = torch.autograd.grad((expected_text * up_t).sum() + (expected_visual * up_v).sum(), (query, key, v_key))
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-8)


def test_gamma_scales_the_visual_branch(unets):
    _, unet, names, _ = unets
    attn = unet.get_submodule(names[0].removesuffix(".processor"))
    hidden = torch.randn(B, 16, attn.to_q.in_features)
    cond = DecoupledConditioning(text=torch.randn(B, T, D), visual=torch.randn(B, 4, D))
    outs = {}
    with torch.no_grad():
        for gamma in (0.0, 1.0, 2.5):
            attn.processor.gamma = gamma
            outs[gamma] = attn(hidden, encoder_hidden_states=cond).double()
    visual = outs[1.0] - outs[0.0]
    assert visual.abs().max() > 1e-3  # the visual branch does something
    torch.testing.assert_close(outs[2.5] - outs[0.0], 2.5 * visual, rtol=1e-4, atol=1e-5)


def test_execution_order_with_two_attentions_per_block():
    """SD1.5 has two transformer layers per cross-attention block: block-major, then attention."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 16), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=D, attention_head_dim=2, norm_num_groups=8).eval()
    names = install_decoupled_attention(unet, gamma=0.0)
    assert len(names) == 2 * 2 + 1 + 2 * 3  # down 2 blocks x 2, mid 1, up 2 blocks x 3 (layers_per_block + 1)
    called = []
    for name in names:
        module = unet.get_submodule(name.removesuffix(".processor"))
        module.register_forward_pre_hook(lambda m, args, kw=None: called.append(m.processor.layer_index))
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, T, D))
    assert called == list(range(len(names)))


def test_subject_location_masks_the_placeholder_and_visual_attention(unets):
    from cc_model.attention import SubjectLocation

    _, unet, names, _ = unets
    attn = unet.get_submodule(names[0].removesuffix(".processor"))
    attn.processor.gamma = 0.7
    side = unet.config.sample_size  # the first cross-attention layer runs at the latent size
    hidden = torch.randn(B, side * side, attn.to_q.in_features)
    text, visual = torch.randn(B, T, D), torch.randn(B, 4, D)
    weights = torch.zeros(B, T)
    weights[:, 5] = 1.0

    def run(mask):
        location = SubjectLocation(placeholder_weights=weights, latent_size=(side, side), mask=mask)
        with torch.no_grad():
            return attn.processor(attn, hidden, encoder_hidden_states=DecoupledConditioning(text, visual, None, location))

    with torch.no_grad():
        plain = attn.processor(attn, hidden, encoder_hidden_states=DecoupledConditioning(text, visual))
    torch.testing.assert_close(run(None), plain)
    torch.testing.assert_close(run(torch.ones(B, side, side)), plain, rtol=1e-5, atol=1e-6)  # explicit path = SDPA

    mask = (torch.rand(B, side, side) > 0.5).float()
    heads = attn.heads
    split = lambda x: x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q = split(attn.to_q(hidden))
        probs = (q @ split(attn.to_k(text)).transpose(-1, -2) * attn.scale).softmax(-1)  # (B, h, N, T)
        keep = mask.reshape(B, 1, -1)  # (B, 1, N)
        probs[..., 5] = probs[..., 5] * keep  # the placeholder's column, masked per query
        out = probs @ split(attn.to_v(text))
        kv = attn.processor.cc_visual_kv
        v_probs = (q @ split(kv.to_k(visual)).transpose(-1, -2) * attn.scale).softmax(-1) * keep[..., None]
        out = out + 0.7 * (v_probs @ split(kv.to_v(visual)))
        expected = attn.to_out[0](out.transpose(1, 2).reshape(B, -1, heads * out.shape[-1]))
    torch.testing.assert_close(run(mask), expected, rtol=1e-5, atol=1e-5)


def test_subject_location_next_mask_comes_from_the_recorded_maps():
    from cc_model.attention import CapturedMaps, SubjectLocation

    location = SubjectLocation(placeholder_weights=torch.ones(1, 3) / 3, latent_size=(8, 8))
    text = torch.full((1, 4, 4), 0.01)
    text[0, 1:3, 1:3] = 0.5  # the placeholder attends to the centre of a 4x4 layer
    logits = torch.zeros(1, 4, 4, 4)  # 4 visual tokens; token 0 wins at the centre queries
    logits[0, 0, 1:3, 1:3] = 3.0
    visual = logits.softmax(dim=1)  # as recorded: each query's probabilities over the m tokens sum to 1
    location.record(CapturedMaps(layer_index=0, height=4, width=4, text=text, visual=visual))
    mask = location.next_mask(0.5)
    assert mask.shape == (1, 8, 8) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, 3:5, 3:5].eq(1).all() and mask[0, 0].eq(0).all() and mask[0, :, 0].eq(0).all()


def test_a_flat_average_map_confines_nothing():
    from cc_model.attention import CapturedMaps, SubjectLocation

    location = SubjectLocation(placeholder_weights=torch.ones(1, 3) / 3, latent_size=(8, 8))
    location.record(CapturedMaps(layer_index=0, height=4, width=4, text=torch.full((1, 4, 4), 0.2),
                                 visual=torch.full((1, 4, 4, 4), 0.25)))
    assert location.next_mask(0.5).eq(1).all()

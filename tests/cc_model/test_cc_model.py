"""The model object: exact gradient flow, ablation switches (Tables 3-4), conditioning dropout."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from cc_model.config import ConditioningDropoutParams, TrainParams


def prefixes(names) -> set[str]:
    """mfi.<part> for MFI weights, 'unet...cc_visual_kv' for the processors' projections."""
    out = set()
    for n in names:
        out.add("unet.*.processor.cc_visual_kv" if ".cc_visual_kv." in n else ".".join(n.split(".")[:2]))
    return out


def step_grads(model, batch):
    model.zero_grad(set_to_none=True)
    terms = model(batch)
    terms["total"].backward()
    return terms


def test_gradients_reach_exactly_the_trainable_parameters(make_model, make_batch):
    model = make_model().eval()  # eval: no conditioning dropout
    batch = make_batch(model)
    trainable = model.trainable_named_parameters()
    assert prefixes(trainable) == {
        "mfi.visual_qformer",
        "mfi.textual_qformer",
        "mfi.tv_fusion",
        "unet.*.processor.cc_visual_kv",
    }
    assert all(p.requires_grad for p in trainable.values())
    frozen = {n: p for n, p in model.named_parameters() if n not in trainable}
    assert frozen and not any(p.requires_grad for p in frozen.values())
    # One step first: the TV fusion's zero-initialised output blocks gradients to its inner weights at init.
    step_grads(model, batch)
    torch.optim.SGD(trainable.values(), lr=1e-2).step()
    step_grads(model, batch)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(p.grad is None for p in frozen.values())


# Paper Table 3 (MFI parts) and Table 4 (losses): parameter groups, query counts, loss terms.
ABLATIONS = {
    "id0_visual": ({"mfi.visual_qformer"}, False, {"ldm", "loc"}),
    "id1_textual": ({"mfi.visual_qformer", "mfi.textual_qformer"}, False, {"ldm", "loc"}),
    "id2_mfi": ({"mfi.visual_qformer", "mfi.textual_qformer", "mfi.tv_fusion"}, False, {"ldm", "loc"}),
    "id3_cscl": ({"mfi.visual_qformer", "mfi.textual_qformer", "mfi.tv_fusion"}, True, {"ldm", "loc", "cscl"}),
    "id4_macl": ({"mfi.visual_qformer", "mfi.textual_qformer", "mfi.tv_fusion"}, False, {"ldm", "loc", "macl"}),
    "id5_full": (
        {"mfi.visual_qformer", "mfi.textual_qformer", "mfi.tv_fusion"},
        True,
        {"ldm", "loc", "cscl", "macl"},
    ),
}


@pytest.mark.parametrize("preset", list(ABLATIONS))
def test_ablation_switches_change_parameters_and_terms(preset, make_model, make_batch, make_params):
    groups, with_cls, terms_expected = ABLATIONS[preset]
    model = make_model(make_params(preset)).eval()
    m, layers = model.params.mfi.num_visual_tokens, len(model.layer_names)
    assert prefixes(model.trainable_named_parameters()) == groups | {"unet.*.processor.cc_visual_kv"}
    assert model.mfi.visual_qformer.queries.shape[0] == m + with_cls
    if model.mfi.textual_qformer is not None:
        assert model.mfi.textual_qformer.queries.layer_embedding.shape[0] == layers + with_cls
    calls = []
    model.text_encoder.register_forward_pre_hook(lambda mod, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    terms = model(make_batch(model))
    assert set(terms) == terms_expected | {"total"}
    batch_size = 4
    assert calls == [batch_size * layers if preset != "id0_visual" else batch_size]  # S+ path vs plain caption


def test_image_dropout_gives_the_base_model_with_the_plain_caption(make_model, make_batch):
    model = make_model(train=TrainParams(dropout=ConditioningDropoutParams(image=1.0, text=0.0, both=0.0)))
    base_unet = copy.deepcopy(model.unet)
    base_unet.set_attn_processor(AttnProcessor2_0())  # the plain diffusers UNet
    batch = make_batch(model)
    model.train()
    terms = model(batch)
    with torch.no_grad():
        text = model.text_encoder(input_ids=batch.input_ids).last_hidden_state
        expected = F.mse_loss(base_unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=text).sample, batch.target)
    assert float(terms["ldm"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["loc"].detach()) == 0.0  # dropped rows do not enter the localisation loss
    assert {"cscl", "macl"} <= set(terms)  # contrastive terms use the undropped features


def test_text_dropout_uses_the_empty_caption(make_model, make_batch):
    model = make_model(train=TrainParams(dropout=ConditioningDropoutParams(image=0.0, text=1.0, both=0.0))).train()
    batch = make_batch(model)
    batch = dataclasses.replace(batch, input_ids=model.tokenize(["no placeholder here"] * 4))
    terms = model(batch)  # no error: dropped captions need no placeholder
    assert float(terms["loc"].detach()) == 0.0


def test_dropout_frequencies_and_eval_mode(make_model):
    model = make_model(train=TrainParams(dropout=ConditioningDropoutParams(image=0.1, text=0.2, both=0.3))).train()
    image, text = model.sample_dropout(20000, "cpu", torch.Generator().manual_seed(1))
    assert float((image & ~text).float().mean()) == pytest.approx(0.1, abs=0.01)
    assert float((text & ~image).float().mean()) == pytest.approx(0.2, abs=0.01)
    assert float((image & text).float().mean()) == pytest.approx(0.3, abs=0.01)
    image, text = model.eval().sample_dropout(100, "cpu")
    assert not image.any() and not text.any()
    assert not model.unet.training  # the frozen parts stay in eval mode whatever the model's mode


def test_caption_without_placeholder_is_an_error(make_model, make_batch):
    model = make_model().eval()
    batch = dataclasses.replace(make_batch(model), input_ids=model.tokenize(["a dog"] * 4))
    with pytest.raises(ValueError, match="placeholder"):
        model(batch)


def test_diffusion_inputs_from_images(make_model):
    from cc_model.model import diffusion_inputs

    model = make_model()
    g = torch.Generator().manual_seed(0)
    noisy, timesteps, target = diffusion_inputs(model, torch.rand(2, 3, 32, 32) * 2 - 1, generator=g)
    assert noisy.shape == target.shape == (2, 4, 16, 16) and timesteps.shape == (2,)
    assert int(timesteps.max()) < model.scheduler.config.num_train_timesteps


def test_compiled_text_encoder_gives_the_same_terms_and_gradients(make_model, make_batch):
    """train.compile_text_encoder goes through torch.compile (aot_eager: traced, no codegen) unchanged."""
    eager, compiled = make_model(), make_model(train=TrainParams(compile_text_encoder="aot_eager"))
    batch = make_batch(eager)
    results = []
    for model in (eager, compiled):
        terms = model.eval()(batch)
        terms["total"].backward()
        results.append((terms, {n: p.grad for n, p in model.trainable_named_parameters().items()}))
    (terms_e, grads_e), (terms_c, grads_c) = results
    assert terms_e.keys() == terms_c.keys()
    for name in terms_e:
        torch.testing.assert_close(terms_c[name], terms_e[name], rtol=1e-4, atol=1e-5)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-3, atol=1e-5)


def test_macl_and_cscl_terms_come_from_the_models_own_tokens(make_model, make_batch):
    """Model-level wiring: [references; positives] order, positive i <-> i+B, each positive with
    its reference's timestep (distinct timesteps catch repeat vs repeat_interleave), the CLS
    tokens: the terms equal the literal references applied to the model's own Q-former outputs."""
    from test_cc_losses import cscl_paper_reference, macl_reference

    model = make_model().eval()
    b = 3
    batch = dataclasses.replace(make_batch(model, batch_size=b, seed=1), timesteps=torch.tensor([5, 500, 990]))
    with torch.no_grad():
        terms = model(batch)
        refs, positives = model.image_features(batch.reference_pixels), model.image_features(batch.positive_pixels)
        t_refs, t_pos = model.mfi.textual(refs, batch.timesteps), model.mfi.textual(positives, batch.timesteps)
        layers = len(model.layer_names)
        loss = model.train_params.loss
        macl = macl_reference(torch.cat([t_refs[:, :layers], t_pos[:, :layers]]),
                              torch.cat([torch.arange(b) + b, torch.arange(b)]), batch.appearance_sim,
                              loss.macl_temperature, loss.macl_r_min)
        visual_cls = model.mfi.visual_qformer(refs)[:, model.params.mfi.num_visual_tokens]
        cscl = cscl_paper_reference(visual_cls, t_refs[:, layers])
    assert float(terms["macl"]) == pytest.approx(macl, rel=1e-5)
    assert float(terms["cscl"]) == pytest.approx(cscl, rel=1e-5)


def test_host_decisions_come_from_the_host_copies(make_model):
    """The forward decides from host memory (no device read-back): which rows skip the S+ call, and
    the most placeholder tokens in one caption, which sizes the localisation maps' columns."""
    from cc_model.model import _HostDecisions

    model = make_model()
    sks = model.params.placeholder_token
    ids = model.tokenize([f"a {sks} dog", f"{sks} and {sks}", "no placeholder", f"a {sks} cup"])
    drop_image = torch.tensor([False, False, False, True])
    drop_text = torch.tensor([False, False, True, False])
    host = _HostDecisions.of(model, ids, drop_image, drop_text)
    assert host.plain.tolist() == [False, False, True, True]  # text dropped, image dropped
    assert host.most_occurrences == 2
    host = _HostDecisions.of(model, ids[:1], torch.tensor([False]), torch.tensor([False]))
    assert host.most_occurrences == 1 and host.plain.tolist() == [False]
    dropped_twice = _HostDecisions.of(model, ids[1:2], torch.tensor([False]), torch.tensor([True]))
    assert dropped_twice.most_occurrences == 1  # the dropped caption is the empty one
    with pytest.raises(ValueError, match="placeholder"):
        _HostDecisions.of(model, ids[2:3], torch.tensor([False]), torch.tensor([False]))


def test_latent_sampling_draws_what_diffusers_draws(make_model):
    """sample_latents (no blocking copy on a GPU) gives diffusers' DiagonalGaussianDistribution.sample's numbers."""
    from cc_model.model import sample_latents

    model = make_model()
    dist = model.vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    ours = sample_latents(dist, torch.Generator().manual_seed(3))
    assert torch.equal(ours, dist.sample(torch.Generator().manual_seed(3)))
    torch.manual_seed(5)  # unseeded: the global generator
    ours = sample_latents(dist, None)
    torch.manual_seed(5)
    assert torch.equal(ours, dist.sample(None))

"""Generation (cc_model.inference): equal to diffusers' own pipeline where it must be; subject location."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cc_model.attention import SubjectLocation
from cc_model.config import SamplingParams
from cc_model.inference import generate

from conftest import params_for

STEPS = 4


def references(model, b=2, seed=0):
    size = model.image_encoder.config.image_size
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def start_latents(model, b=2):
    s = model.unet.config.sample_size
    return torch.randn(b, model.unet.config.in_channels, s, s, generator=torch.Generator().manual_seed(1))


def test_without_the_visual_branch_and_placeholder_it_is_diffusers_pipeline(make_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = make_model(params=params_for(gamma=0.0))
    prompts = ["a photo of a red cup", "a dog on the beach"]  # no placeholder: the S+ path is the plain one
    ours = generate(model, references(model), prompts, params=SamplingParams(steps=STEPS, guidance_scale=5.0),
                    latents=start_latents(model))
    assert ours.location is None  # nothing to locate without the placeholder
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompts, negative_prompt=["", ""], num_inference_steps=STEPS, guidance_scale=5.0,
                  latents=start_latents(model), output_type="pt").images
    torch.testing.assert_close(ours.images, theirs, rtol=1e-4, atol=1e-4)


def test_subject_location_is_carried_from_step_to_step(make_model, monkeypatch):
    model = make_model(params=params_for(loc_min_downsample=1))
    masks_seen = []
    real_init = SubjectLocation.__init__

    def spy(self, **kwargs):
        masks_seen.append(kwargs["mask"])
        real_init(self, **kwargs)

    monkeypatch.setattr(SubjectLocation, "__init__", spy)
    prompts = ["a photo of sks cup", "a photo of a cup"]  # the second has no placeholder
    out = generate(model, references(model), prompts, params=SamplingParams(steps=STEPS),  # threshold 0.5
                   latents=start_latents(model))
    assert out.images.shape == (2, 3, 32, 32) and 0 <= out.images.min() <= out.images.max() <= 1
    side = model.unet.config.sample_size
    assert out.location.shape == (2, side, side) and set(out.location.unique().tolist()) <= {0.0, 1.0}
    assert out.location[1].eq(1).all()  # no placeholder: nothing to confine
    assert 0 < out.location[0].sum() < side * side  # a located subject, not everything
    assert masks_seen[0] is None and len(masks_seen) == STEPS  # the first step runs unmasked
    for mask in masks_seen[1:]:  # [unconditional rows (ones); conditional rows (the location)]
        assert mask.shape == (4, side, side) and mask[:2].eq(1).all()

    off = generate(model, references(model), prompts, params=SamplingParams(steps=STEPS, subject_location=False),
                   latents=start_latents(model))
    assert off.location is None and not torch.allclose(off.images, out.images)


def test_same_seed_same_images_and_prompts_must_match_references(make_model):
    model = make_model()
    params = SamplingParams(steps=2, seed=3)
    one = generate(model, references(model), ["sks cup", "sks dog"], params=params).images
    two = generate(model, references(model), ["sks cup", "sks dog"], params=params).images
    torch.testing.assert_close(one, two, rtol=0, atol=0)
    other = generate(model, references(model), ["sks cup", "sks dog"], params=dataclasses.replace(params, seed=4))
    assert not torch.equal(one, other.images)
    with pytest.raises(ValueError, match="3 prompts for 2 reference images"):
        generate(model, references(model), ["a", "b", "c"], params=params)


def test_unconditional_half_and_per_step_timesteps(make_model, monkeypatch):
    from diffusers import DDIMScheduler

    model = make_model()
    seen_t, seen_cond = [], []
    real_mfi, real_unet = model.mfi.forward, model.unet.forward
    monkeypatch.setattr(model.mfi, "forward", lambda f, t, f_t=None: seen_t.append(t.clone()) or real_mfi(f, t, f_t))

    def unet(sample, t, encoder_hidden_states=None, **kw):
        seen_cond.append(encoder_hidden_states)
        return real_unet(sample, t, encoder_hidden_states=encoder_hidden_states, **kw)

    monkeypatch.setattr(model.unet, "forward", unet)
    generate(model, references(model), ["a photo of sks cup", "sks dog"], params=SamplingParams(steps=STEPS),
             latents=start_latents(model))
    scheduler = DDIMScheduler.from_config(model.scheduler.config)
    scheduler.set_timesteps(STEPS)
    assert [int(t[0]) for t in seen_t] == scheduler.timesteps.tolist()  # the textual Q-former sees each step's t
    assert all(bool((t == t[0]).all()) for t in seen_t)
    empty = model.text.encode(model.empty_ids.expand(2, -1))
    for cond in seen_cond:  # [unconditional; conditional]
        assert cond.visual[:2].abs().max() == 0 and cond.visual[2:].abs().max() > 0  # no image in the first half
        text = torch.stack(cond.text, dim=1) if isinstance(cond.text, tuple) else cond.text  # (2B, l, T, D)
        assert not isinstance(cond.text, tuple) or all(t.is_contiguous() for t in cond.text)
        torch.testing.assert_close(text[:2], empty[:, None].expand_as(text[:2]))  # the empty caption
        assert not torch.allclose(text[2:], text[:2])

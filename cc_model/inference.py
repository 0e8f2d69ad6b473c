"""Generation with a (trained) CustomContrast model: DDIM, classifier-free guidance, subject location.

At every denoising step t the MFI encoder runs on the reference features with t (the textual
Q-former's queries depend on the timestep), the caption is encoded once per cross-attention
layer with that layer's S+ token, and the UNet runs on [unconditional; conditional]: the
unconditional half has the empty caption and no visual tokens, exactly the rows that
conditioning dropout trains. The guided noise is eps_u + g (eps_c - eps_u).

Timestep-specific subject location (DESIGN.md section 2): the attention maps of step t form
A_g, whose binary mask (A_g rescaled to [0, 1] between its minimum and maximum, at or above
``location_threshold``) confines the visual attention and the placeholder's text attention at
the next step (cc_model.attention.SubjectLocation). The first step runs unmasked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from cc_model.attention import DecoupledConditioning, SubjectLocation, placeholder_weights
from cc_model.config import SamplingParams
from cc_model.model import CustomContrastModel


@dataclass
class Generated:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    location: torch.Tensor | None  # (B, h, w) the last subject-location mask at latent size; None if off


@torch.no_grad()
def generate(model: CustomContrastModel, reference_pixels: torch.Tensor, prompts: list[str], *,
             params: SamplingParams, latents: torch.Tensor | None = None) -> Generated:
    """Images for ``prompts`` (each holding the placeholder word, or not) given CLIP-normalised
    ``reference_pixels`` (B, 3, S, S) of the subjects (backbones.clip_pixels)."""
    if len(prompts) != reference_pixels.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {reference_pixels.shape[0]} reference images")
    model.eval()
    device, dtype = reference_pixels.device, model.unet.dtype
    # frozen weights cast to bf16 (cast_frozen) beside float32 trainable ones need autocast
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        return _generate(model, reference_pixels, prompts, params=params, latents=latents)


def _generate(model: CustomContrastModel, reference_pixels: torch.Tensor, prompts: list[str], *,
              params: SamplingParams, latents: torch.Tensor | None) -> Generated:
    device, dtype, b = reference_pixels.device, model.unet.dtype, len(prompts)
    # SD1.5 trains without sample clipping; a scheduler config that omits the key would default to True
    scheduler = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(params.steps, device=device)
    size = model.unet.config.sample_size
    if latents is None:
        generator = torch.Generator().manual_seed(params.seed)
        latents = torch.randn((b, model.unet.config.in_channels, size, size), generator=generator)
    latents = latents.to(device, torch.float32) * scheduler.init_noise_sigma  # the DDIM updates stay float32

    input_ids = model.tokenize(prompts).to(device)  # (B, T)
    empty_ids = model.empty_ids.to(device).expand(b, -1)
    both_ids = torch.cat([empty_ids, input_ids])  # (2B, T): [unconditional; conditional]
    with_placeholder = (input_ids == model.text.placeholder_id).any(dim=1)  # (B,)
    uncond_text = model.text.encode(empty_ids)  # (B, T, D)
    f_image = model.image_features(reference_pixels.to(model.image_encoder.dtype))
    locate = params.subject_location and bool(with_placeholder.any())
    mask = None

    for t in scheduler.timesteps:
        timesteps = t.expand(b).to(device)
        out = model.mfi(f_image, timesteps)
        if out.splus is not None:
            text = model.text.encode_per_layer(input_ids, out.splus.to(uncond_text.dtype),
                                               plain=~with_placeholder)  # (B, l, T, D)
            uncond = uncond_text[:, None].expand_as(text)
        else:
            text, uncond = model.text.encode(input_ids), uncond_text
        visual = out.visual_tokens.to(dtype)
        location = None
        if locate:
            ones = torch.ones(b, size, size, device=device)
            location = SubjectLocation(placeholder_weights=placeholder_weights(both_ids, model.text.placeholder_id),
                                       latent_size=(size, size), min_downsample=model.params.loc_min_downsample,
                                       mask=None if mask is None else torch.cat([ones, mask]))
        # per layer, (2B, T, D) contiguous: [unconditional; conditional] (a (B, T, D) text is shared by all layers)
        both = (torch.cat([uncond, text]) if text.ndim == 3 else
                tuple(torch.cat(pair) for pair in zip(uncond.unbind(1), text.unbind(1))))
        conditioning = DecoupledConditioning(text=both, visual=torch.cat([torch.zeros_like(visual), visual]),
                                             location=location)
        noise = model.unet(torch.cat([latents, latents]).to(dtype), t, encoder_hidden_states=conditioning).sample
        noise_uncond, noise_cond = noise.float().chunk(2)
        noise = noise_uncond + params.guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
        if location is not None:
            mask = location.next_mask(params.location_threshold)[b:]  # the conditional half
            mask = torch.where(with_placeholder[:, None, None], mask, torch.ones_like(mask))

    vae = model.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return Generated(images=(images.float() / 2 + 0.5).clamp(0, 1), location=mask)


__all__ = ["Generated", "generate"]

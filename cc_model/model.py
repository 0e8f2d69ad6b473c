"""The one CustomContrast model object: batch in, named loss terms out.

Trainable: the MFI encoder (``mfi.*``) and the visual key/value projections of every
cross-attention processor (``*.cc_visual_kv.*``). Everything else is the frozen backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cc_model.attention import (
    TRAINABLE_PREFIX,
    AttentionCapture,
    DecoupledConditioning,
    install_decoupled_attention,
    placeholder_weights,
    set_gamma,
)
from cc_model.backbones import Backbones
from cc_model.config import ModelParams, TrainParams, resolve_model_params
from cc_model.losses import CSCLLoss, LDMLoss, LocalisationLoss, MACLLoss, TotalLoss
from cc_model.mfi import MFIEncoder, MFIOutput
from cc_model.splus import SPlusTextEncoder, placeholder_token_id, tokenize_captions


@dataclass
class TrainBatch:
    """One training batch of B reference/positive pairs."""

    reference_pixels: torch.Tensor  # (B, 3, S, S) CLIP-normalised reference images (backbones.clip_pixels)
    input_ids: torch.Tensor  # (B, T) tokenized captions holding the placeholder word (model.tokenize);
    # best in host memory (the forward reads its decisions from them; on the device that is a sync)
    noisy_latents: torch.Tensor  # (B, C, h, w) z_t of the target frame
    timesteps: torch.Tensor  # (B,) long diffusion timesteps
    target: torch.Tensor  # (B, C, h, w) the noise (epsilon prediction) or v (v-prediction)
    masks: torch.Tensor | None = None  # (B, 1, H, W) target-frame subject masks in [0, 1] (localisation)
    positive_pixels: torch.Tensor | None = None  # (B, 3, S, S) another frame of each subject (MACL)
    appearance_sim: torch.Tensor | None = None  # (2B, 2B) r_ij over [references; positives] (MACL)


def is_trainable_name(name: str) -> bool:
    return name.startswith("mfi.") or f".{TRAINABLE_PREFIX}." in name


class CustomContrastModel(nn.Module):
    """Frozen SD backbones + MFI encoder + decoupled cross-attention + the loss terms."""

    def __init__(self, *, backbones: Backbones, params: ModelParams, train: TrainParams | None = None):
        super().__init__()
        unet, text_encoder, image_encoder = backbones.unet, backbones.text_encoder, backbones.image_encoder
        text_dim, cross_dim = text_encoder.config.hidden_size, unet.config.cross_attention_dim
        if text_dim != cross_dim:
            raise ValueError(f"text encoder width {text_dim} != UNet cross_attention_dim {cross_dim}")
        self.params = resolve_model_params(
            params, cross_attention_dim=cross_dim, image_num_hidden_layers=image_encoder.config.num_hidden_layers
        )
        self.train_params = train or TrainParams()
        self.profile = backbones.profile
        self.unet, self.text_encoder, self.image_encoder, self.vae = unet, text_encoder, image_encoder, backbones.vae
        self.tokenizer, self.scheduler = backbones.tokenizer, backbones.scheduler
        self.layer_names = install_decoupled_attention(unet, gamma=self.params.gamma)
        self.mfi = MFIEncoder(
            params=self.params,
            image_dim=image_encoder.config.hidden_size,
            cross_attention_dim=cross_dim,
            text_dim=text_dim,
            num_cross_attention_layers=len(self.layer_names),
        )
        if self.train_params.compile_text_encoder:  # the stack only: the S+ hook on the embeddings stays eager
            text_encoder.encoder.compile(backend=self.train_params.compile_text_encoder)
        self.text = SPlusTextEncoder(
            text_encoder=text_encoder, placeholder_id=placeholder_token_id(self.tokenizer, self.params.placeholder_token)
        )
        self.register_buffer("empty_ids", self.tokenize([""]), persistent=False)  # (1, T) the dropped caption
        loss = self.train_params.loss
        self.ldm_loss = LDMLoss()
        self.cscl_loss = CSCLLoss(form=loss.cscl_form, temperature=loss.cscl_temperature, reduction=loss.reduction)
        self.macl_loss = MACLLoss(temperature=loss.macl_temperature, r_min=loss.macl_r_min, reduction=loss.reduction)
        self.loc_loss = LocalisationLoss()
        self.total_loss = TotalLoss(lambda1=loss.lambda1, lambda2=loss.lambda2)

    # ------------------------------------------------------------------ parameters

    def trainable_named_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if is_trainable_name(n)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_named_parameters().items()}

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.unet, self.text_encoder, self.image_encoder, self.vae):
            frozen.eval()  # frozen backbones never switch to training behaviour
        return self

    def set_gamma(self, gamma: float) -> None:
        set_gamma(self.unet, gamma)

    # ------------------------------------------------------------------ inputs

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, T) ids padded to the text encoder's length."""
        return tokenize_captions(self.tokenizer, captions)

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> f_I (B, K*T, D_img): hidden states of K layers, concatenated along tokens."""
        hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        return torch.cat([hidden[i] for i in self.params.mfi.image_layers], dim=1)

    def sample_dropout(self, batch_size: int, device, generator: torch.Generator | None = None):
        """Per-sample (drop_image, drop_text) bool masks on ``device``; none in eval mode."""
        image, text = self._host_dropout(batch_size, generator)
        return image.to(device), text.to(device)

    def _host_dropout(self, batch_size: int, generator: torch.Generator | None):
        """sample_dropout's masks in host memory, where the forward decides from them without a device sync."""
        none = torch.zeros(batch_size, dtype=torch.bool)
        if not self.training:
            return none, none
        p = self.train_params.dropout
        u = torch.rand(batch_size, generator=generator)
        image_only, text_only = u < p.image, (u >= p.image) & (u < p.image + p.text)
        both = (u >= p.image + p.text) & (u < p.image + p.text + p.both)
        return image_only | both, text_only | both

    # ------------------------------------------------------------------ forward

    def forward(self, batch: TrainBatch, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms ("ldm", and per ablation "cscl", "macl", "loc") plus their weighted "total"."""
        self._check(batch)
        b, device = batch.input_ids.shape[0], batch.noisy_latents.device
        # Every data-dependent decision (the caption check, which rows skip the S+ call, the most
        # placeholder occurrences in a caption) is made on host copies of the captions and the
        # dropout masks. A decision read back from the device would wait for all queued work and
        # leave the device idle while the host queues the next; the step has no such wait when
        # input_ids come in host memory, as the training loader gives them.
        host = _HostDecisions.of(self, batch.input_ids.cpu(), *self._host_dropout(b, generator))
        drop_image, drop_text = (mask.to(device, non_blocking=True) for mask in (host.drop_image, host.drop_text))
        input_ids = batch.input_ids.to(device, non_blocking=True)
        input_ids = torch.where(drop_text[:, None], self.empty_ids.to(device), input_ids)  # (B, T)
        out, f_t_all = self._encode_images(batch)
        conditioning = self._conditioning(out, input_ids, drop_image, host, latent_size=batch.noisy_latents.shape[-2:])
        prediction = self.unet(batch.noisy_latents, batch.timesteps, encoder_hidden_states=conditioning).sample

        terms = self.ldm_loss(prediction, batch.target)
        if self.params.ablation.cscl:
            terms |= self.cscl_loss(out.visual_cls, out.textual_cls)
        if self.params.ablation.macl:
            positive_index = torch.cat([torch.arange(b, 2 * b, device=device), torch.arange(b, device=device)])  # (2B,)
            terms |= self.macl_loss(f_t_all[:, : len(self.layer_names)], positive_index, batch.appearance_sim)
        if conditioning.capture is not None:
            keep = (~drop_image & ~drop_text).float()  # dropped rows have no subject to localise
            terms |= self.loc_loss(conditioning.capture.maps, batch.masks, sample_weight=keep)
        terms["total"] = self.total_loss(terms)
        return terms

    def _check(self, batch: TrainBatch) -> None:
        ablation = self.params.ablation
        if ablation.macl and (batch.appearance_sim is None or batch.positive_pixels is None):
            raise ValueError("MACL needs positive_pixels and appearance_sim in the batch")
        if ablation.localisation and batch.masks is None:
            raise ValueError("the localisation loss needs masks in the batch")

    def _encode_images(self, batch: TrainBatch) -> tuple[MFIOutput, torch.Tensor | None]:
        """MFI outputs of the references, and f_t of [references; positives] when MACL needs them."""
        b = batch.input_ids.shape[0]
        pixels = batch.reference_pixels
        if self.params.ablation.macl:  # the positives go through the same encoder and textual Q-former
            pixels = torch.cat([batch.reference_pixels, batch.positive_pixels])  # (2B, 3, S, S)
        f_image = self.image_features(pixels)  # (B', N, D_img)
        f_t_all = None
        if self.params.ablation.textual_qformer:
            timesteps = batch.timesteps.repeat(pixels.shape[0] // b)  # a positive shares its reference's t
            f_t_all = self.mfi.textual(f_image, timesteps)  # (B', l[+1], D_text)
        out = self.mfi(f_image[:b], batch.timesteps, f_t=None if f_t_all is None else f_t_all[:b])
        return out, f_t_all

    def _conditioning(self, out: MFIOutput, input_ids, drop_image, host: _HostDecisions, *,
                      latent_size) -> DecoupledConditioning:
        """Per-layer (S+) or shared text features, visual tokens and, if needed, a map capture.

        Dropping the image zeroes the visual tokens (bias-free K/V: the visual branch adds exactly 0)
        and restores the placeholder's ordinary embedding: the base model with the plain caption.
        """
        visual = out.visual_tokens * (~drop_image).to(out.visual_tokens.dtype)[:, None, None]  # (B, m, D)
        if out.splus is not None:
            ordinary = self.text.placeholder_embedding().to(out.splus.dtype)
            splus = torch.where(drop_image[:, None, None], ordinary, out.splus)  # (B, l, D)
            text = self.text.encode_per_layer(input_ids, splus, plain=host.plain).unbind(1)  # l x (B, T, D)
        else:
            with torch.no_grad():
                text = self.text.encode(input_ids)  # (B, T, D) shared by every layer
        capture = None
        if self.params.ablation.localisation:
            capture = AttentionCapture(
                placeholder_weights=placeholder_weights(input_ids, self.text.placeholder_id),
                latent_size=tuple(latent_size),
                min_downsample=self.params.loc_min_downsample,
                most_occurrences=host.most_occurrences,
            )
        return DecoupledConditioning(text=text, visual=visual, capture=capture)


@dataclass(frozen=True)
class _HostDecisions:
    """What the forward decides from the captions and the dropout masks, all in host memory."""

    drop_image: torch.Tensor  # (B,) bool
    drop_text: torch.Tensor  # (B,) bool
    plain: torch.Tensor  # (B,) bool: rows with no S+ (image dropped, or no placeholder after dropout)
    most_occurrences: int  # the most placeholder tokens in one caption (at least 1)

    @classmethod
    def of(cls, model: CustomContrastModel, input_ids: torch.Tensor, drop_image: torch.Tensor,
           drop_text: torch.Tensor) -> _HostDecisions:
        counts = (input_ids == model.text.placeholder_id).sum(dim=1)  # (B,)
        if bool(((counts == 0) & ~drop_text).any()):
            raise ValueError(f"captions without the placeholder {model.params.placeholder_token!r} in the batch")
        counts = counts.masked_fill(drop_text, 0)  # a dropped caption is the empty one
        return cls(drop_image, drop_text, drop_image | (counts == 0), max(1, int(counts.max())))


def cast_frozen(model: CustomContrastModel, dtype: torch.dtype) -> CustomContrastModel:
    """Frozen weights to ``dtype`` (e.g. bf16), trainable weights kept in float32 (use autocast)."""
    model.to(dtype)
    for param in model.trainable_named_parameters().values():
        param.data = param.data.float()
    return model


def sample_latents(dist, generator: torch.Generator | None) -> torch.Tensor:
    """``dist.sample(generator)`` (diffusers' DiagonalGaussianDistribution), the same numbers, with
    no blocking copy: a CPU generator's noise is drawn on the host, as diffusers draws it, but
    copied without waiting for the device (diffusers' copy waits for all queued work)."""
    device, dtype = dist.parameters.device, dist.parameters.dtype
    on_host = generator is not None and generator.device.type == "cpu" and device.type != "cpu"
    eps = torch.randn(dist.mean.shape, generator=generator, device="cpu" if on_host else device, dtype=dtype)
    return dist.mean + dist.std * eps.to(device, non_blocking=True)


@torch.no_grad()
def diffusion_inputs(model: CustomContrastModel, images: torch.Tensor, *, generator: torch.Generator | None = None):
    """(B, 3, H, W) images in [-1, 1] -> (noisy_latents, timesteps, target) for a TrainBatch."""
    vae, scheduler = model.vae, model.scheduler
    latents = sample_latents(vae.encode(images.to(vae.dtype)).latent_dist, generator) * vae.config.scaling_factor
    # drawn on the host (a CPU generator: the same numbers on every device), copied without waiting
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device, non_blocking=True)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device, non_blocking=True)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, target


__all__ = ["CustomContrastModel", "TrainBatch", "cast_frozen", "diffusion_inputs", "is_trainable_name",
           "sample_latents"]

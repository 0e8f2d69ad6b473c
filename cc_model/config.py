"""Typed configs of the CustomContrast model (``model:``) and its training objective (``train:``).

Plain frozen, keyword-only dataclasses with no heavy imports: flows/config/params.py embeds
them in the params.yaml schema and the strict loader (flows/config/typed.py) builds them.
Model code takes these objects, never dicts. Fields left ``None`` are derived from the
backbones by :func:`resolve_model_params`; the resolved copy is what checkpoints store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from flows.config.typed import ParamsError, at_least  # pure Python, no heavy imports

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
IP_ADAPTER_REPO = "h94/IP-Adapter"


@dataclass(frozen=True, kw_only=True)
class BackboneParams:
    """Where the frozen backbones come from."""

    profile: Literal["tiny", "sd15"] = "tiny"  # tiny: random small configs built in code; sd15: real weights
    tiny_seed: int = 0  # seed of the random tiny weights (profile tiny only)
    sd15_path: str = SD15_REPO  # local diffusers folder, or a repo id looked up in the HF cache only
    image_encoder_path: str = IP_ADAPTER_REPO  # local transformers CLIPVisionModel folder or repo id
    image_encoder_subfolder: str = "models/image_encoder"  # inside image_encoder_path; "" for none


@dataclass(frozen=True, kw_only=True)
class MFIParams:
    """The MFI encoder: visual and textual Q-formers over multi-layer CLIP image features."""

    num_visual_tokens: int = 16  # m: visual tokens injected into every visual cross-attention
    num_image_layers: int = 3  # K: CLIP image-encoder layers concatenated into f_I
    image_layers: list[int] = field(default_factory=list)  # explicit hidden-state indices; [] = K evenly spaced, last = penultimate
    dim: int | None = None  # Q-former width; None = the UNet's cross_attention_dim
    depth: int = 4  # PA + feed-forward layers per Q-former (paper: 4)
    heads: int | None = None  # attention heads in the Q-formers; None = dim // 64 (at least 1)
    ff_mult: int = 4  # feed-forward hidden width as a multiple of dim


@dataclass(frozen=True, kw_only=True)
class AblationParams:
    """Switches for the paper's ablations (Tables 3 and 4); see ABLATION_PRESETS."""

    textual_qformer: bool = True  # S+ tokens from the textual Q-former replace the placeholder per layer
    tv_fusion: bool = True  # refine the visual tokens by attending to the textual tokens (needs textual_qformer)
    cscl: bool = True  # crossmodal semantic contrast on the CLS tokens (adds both CLS queries)
    macl: bool = True  # multiscale appearance contrast on the S+ tokens (needs textual_qformer)
    localisation: bool = True  # localisation loss on the averaged attention maps

    def __post_init__(self) -> None:
        for name in ("tv_fusion", "cscl", "macl"):
            if getattr(self, name) and not self.textual_qformer:
                raise ParamsError(
                    f"model.ablation.{name}: requires model.ablation.textual_qformer (it uses the textual tokens)"
                )


# Paper Table 3 (IDs 0-2: MFI encoder parts) and Table 4 (IDs 2-5: contrastive losses).
# The localisation loss is not part of either ablation and stays on throughout.
ABLATION_PRESETS: dict[str, AblationParams] = {
    "id0_visual": AblationParams(textual_qformer=False, tv_fusion=False, cscl=False, macl=False),
    "id1_textual": AblationParams(textual_qformer=True, tv_fusion=False, cscl=False, macl=False),
    "id2_mfi": AblationParams(textual_qformer=True, tv_fusion=True, cscl=False, macl=False),
    "id3_cscl": AblationParams(textual_qformer=True, tv_fusion=True, cscl=True, macl=False),
    "id4_macl": AblationParams(textual_qformer=True, tv_fusion=True, cscl=False, macl=True),
    "id5_full": AblationParams(textual_qformer=True, tv_fusion=True, cscl=True, macl=True),
}


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    """The whole model: backbones, MFI encoder, decoupled cross-attention, ablation switches."""

    backbone: BackboneParams = field(default_factory=BackboneParams)
    mfi: MFIParams = field(default_factory=MFIParams)
    ablation: AblationParams = field(default_factory=AblationParams)
    placeholder_token: str = "sks"  # the caption word whose embedding the S+ tokens replace; one BPE token
    gamma: float = 1.0  # weight of the visual cross-attention branch (Eq. 3)
    # Localisation maps come from the cross-attention layers at latent_size / f with f >= this.
    # 2 (default) skips the full-resolution layers (SD1.5: the 64x64 ones in down_blocks.0 and
    # up_blocks.3), as FastComposer, where the loss comes from, does: its default
    # localization_layers=5 keeps the middle five of down0..2, mid, up1..3. 1 = every layer
    # (DESIGN's literal "all maps"); it cost +0.13-0.2x of a step on an H100 in 64x64 layers.
    loc_min_downsample: int = 2


@dataclass(frozen=True, kw_only=True)
class LossParams:
    """Weights and forms of the loss terms (Eq. 9)."""

    lambda1: float = 1e-2  # weight of CSCL + MACL (paper: 1e-2)
    lambda2: float = 1e-3  # weight of the localisation loss (paper: 1e-3)
    cscl_form: Literal["paper", "infonce"] = "paper"  # paper: Eq. 4, no temperature, positive not in the denominator
    cscl_temperature: float = 0.07  # infonce form only
    macl_temperature: float = 0.07  # tau of Eq. 7 (the main text gives no value)
    macl_r_min: float = 0.1  # r_ij is clamped to [r_min, 1] before alpha = 1 / r_ij
    reduction: Literal["sum", "mean"] = "sum"  # over anchors i in CSCL and MACL; the paper writes sums


@dataclass(frozen=True, kw_only=True)
class ConditioningDropoutParams:
    """Per-sample conditioning dropout for classifier-free guidance (IP-Adapter: 5% each)."""

    image: float = 0.05  # drop the image only (no visual tokens, plain placeholder embedding)
    text: float = 0.05  # drop the caption only (empty caption)
    both: float = 0.05  # drop image and caption together

    def __post_init__(self) -> None:
        if min(self.image, self.text, self.both) < 0 or self.image + self.text + self.both > 1:
            raise ParamsError("train.dropout: probabilities must be >= 0 and sum to at most 1")


@dataclass(frozen=True, kw_only=True)
class TrainParams:
    """The training objective and the step (paper: lr 3e-5, 200k iterations)."""

    seed: int = 0  # seeds dropout draws, timesteps and noise, and the order of the samples
    lr: float = 3e-5  # AdamW learning rate of the trainable weights
    batch_size: int = 8  # reference/positive pairs per step
    max_steps: int = 200_000  # optimizer steps; raising it continues a finished run from its last state
    # torch.compile backend for the text encoder's transformer stack, which the S+ path runs on
    # B*l sequences with a backward pass (the largest extra cost over IP-Adapter); None = eager.
    compile_text_encoder: str | None = None  # e.g. "inductor"
    loss: LossParams = field(default_factory=LossParams)
    dropout: ConditioningDropoutParams = field(default_factory=ConditioningDropoutParams)
    # The train stage (python -m cc_model.train): where it writes, and how it runs.
    out_dir: str = "data/train"  # checkpoint/, stats.json, loss.csv; .work/ holds the state to resume from
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when present (bf16 frozen weights there)
    num_workers: int = 2  # DataLoader processes decoding the shards (0: in the training process)
    save_every: int = 1000  # steps between saved training states (a killed run resumes from the last)
    # Data-parallel processes (torch DDP): one per GPU on CUDA (gloo processes on a CPU). Each
    # takes its own batch of batch_size samples, contrasted within itself; gradients are averaged,
    # so a step sees batch_size * processes samples.
    processes: int = 1
    # Batches never hold two samples of one subject (CSCL/MACL take every other sample as a
    # negative); with this, nor two subjects the similarity stage flagged as near-duplicates.
    avoid_near_duplicates: bool = True
    # Rows per batch drawn as hard negatives (similarity stage's hard_negatives.parquet): until a
    # batch holds n, each row dealt into it brings a row of its most similar other subject that
    # fits, so the contrastive terms see close negatives. 0 = the paper's batches of random subjects.
    hard_negatives_per_batch: int = 0

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size", "max_steps", "save_every", "processes")
        at_least(self, 0, "num_workers", "hard_negatives_per_batch")
        if self.hard_negatives_per_batch >= self.batch_size:
            raise ParamsError(f"hard_negatives_per_batch: must be below batch_size ({self.batch_size}), "
                              f"got {self.hard_negatives_per_batch}")
        if not self.lr > 0:
            raise ParamsError(f"lr: must be > 0, got {self.lr!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Generation (cc_model.inference): DDIM sampling with classifier-free guidance."""

    steps: int = 50  # DDIM denoising steps
    guidance_scale: float = 7.5  # classifier-free guidance against the empty caption and no image
    subject_location: bool = True  # timestep-specific subject location (DESIGN.md section 2)
    location_threshold: float = 0.5  # A_g, rescaled to [0, 1] between its min and max, at or above this is the subject's location
    seed: int = 0  # seeds the initial latents

    def __post_init__(self) -> None:
        at_least(self, 1, "steps")
        at_least(self, 0.0, "guidance_scale")
        if not 0.0 < self.location_threshold <= 1.0:
            raise ParamsError(f"location_threshold: must be in (0.0, 1.0], got {self.location_threshold!r}")


@dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    """DreamBench evaluation of the trained checkpoint (stage ``evaluate``; DESIGN.md section 2)."""

    out_dir: str = "data/evaluate"  # stats.json, scores.parquet, grid.png; .work/ while it runs
    profile: Literal["tiny", "real"] = "tiny"  # metric models: tiny = random small CLIP and DINO (scores meaningless)
    clip_model: str = "ViT-B-32"  # open_clip model of CLIP-T and CLIP-I (profile real)
    clip_pretrained: str = "openai"  # its open_clip tag, or a local checkpoint file
    dino_path: str = "facebook/dino-vits16"  # DINO-I's ViT: a local transformers folder or a repo id in the HF cache
    images_per_prompt: int = 4  # generated images per (subject, prompt)
    batch_size: int = 8  # images generated per call
    segment_subjects: bool = True  # CLIP-I / DINO-I on subjects cut out by SAM (segment.sam_*); False: whole images (the conditioning photo is SAM's cut-out either way)
    live_classes: list[str] = field(default_factory=lambda: ["cat", "dog"])  # classes that take the live prompts
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        at_least(self, 1, "images_per_prompt", "batch_size")


def default_image_layers(num_hidden_layers: int, k: int) -> list[int]:
    """K hidden-state indices, evenly spaced, coarse to fine, the last one the penultimate layer.

    ``hidden_states[i]`` is the output of encoder layer i (index 0 is the embeddings), so the
    penultimate layer is index ``num_hidden_layers - 1``.
    """
    last = num_hidden_layers - 1
    if k < 1 or k > last:
        raise ParamsError(f"model.mfi.num_image_layers: {k} is not in 1..{last}")
    return [round(last * (i + 1) / k) for i in range(k)]


def resolve_model_params(
    params: ModelParams, *, cross_attention_dim: int, image_num_hidden_layers: int
) -> ModelParams:
    """Fill the ``None``/empty fields from the backbones; the result is what a checkpoint stores."""
    mfi = params.mfi
    dim = mfi.dim or cross_attention_dim
    heads = mfi.heads or max(1, dim // 64)
    if dim % heads:
        raise ParamsError(f"model.mfi.heads: {heads} does not divide dim {dim}")
    layers = list(mfi.image_layers) or default_image_layers(image_num_hidden_layers, mfi.num_image_layers)
    if any(not 0 <= i <= image_num_hidden_layers for i in layers):
        raise ParamsError(f"model.mfi.image_layers: {layers} outside 0..{image_num_hidden_layers}")
    mfi = dataclasses.replace(mfi, dim=dim, heads=heads, image_layers=layers, num_image_layers=len(layers))
    return dataclasses.replace(params, mfi=mfi)


__all__ = [
    "ABLATION_PRESETS",
    "AblationParams",
    "BackboneParams",
    "ConditioningDropoutParams",
    "LossParams",
    "MFIParams",
    "ModelParams",
    "TrainParams",
    "default_image_layers",
    "resolve_model_params",
]

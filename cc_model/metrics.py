"""The models behind the DreamBench scores: CLIP (CLIP-T, CLIP-I) and DINO (DINO-I).

- CLIP: an open_clip model (the usual ViT-B/32, ``openai``), loaded by flows.embed.clip_model,
  so the same offline lookup and error messages apply; its own eval transform and tokenizer.
- DINO: a transformers ``ViTModel`` (the usual ``facebook/dino-vits16``) from a local folder or
  the Hugging Face cache, never the network; the CLS token of the last layer after DINO's eval
  transform (resize to 256/224 of the input side, centre crop, ImageNet mean and std).

Scores are cosines of L2-normalised embeddings. Profile ``tiny`` builds random small models of
the same kinds (their scores are meaningless, and the log says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from transformers import ViTConfig, ViTModel

from cc_model.config import EvaluateParams
from flows.embed.clip_model import TINY_MODEL, ClipSpec, LoadedClip, MissingCheckpointError, load_clip

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                 patch_size=8)


@dataclass
class MetricModels:
    clip: LoadedClip
    tokenizer: object  # open_clip tokenizer of the CLIP model
    dino: ViTModel
    dino_transform: transforms.Compose
    device: torch.device
    random_weights: bool


def dino_transform(size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(round(size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def load_dino(path_or_repo: str) -> ViTModel:
    """A DINO ViT from a local transformers folder, or from the Hugging Face cache (no network)."""
    local = Path(path_or_repo)
    try:
        return ViTModel.from_pretrained(str(local) if local.is_dir() else path_or_repo, local_files_only=True,
                                        add_pooling_layer=False)
    except OSError as exc:
        raise MissingCheckpointError(
            f"evaluate: no DINO model at {path_or_repo!r} (evaluate.dino_path), neither a folder nor in the Hugging "
            f"Face cache, and this machine has no network. On a machine with network run `hf download "
            f"facebook/dino-vits16 --local-dir models/dino-vits16` and set evaluate.dino_path to that folder "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def random_dino(seed: int = 0) -> ViTModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(ViTConfig(**TINY_DINO), add_pooling_layer=False)


def load_metric_models(params: EvaluateParams, device: torch.device) -> MetricModels:
    if params.profile == "tiny":
        spec, dino = ClipSpec(TINY_MODEL, None), random_dino()
        log.warning("evaluate: profile tiny: CLIP and DINO have RANDOM weights; the scores are meaningless")
    else:
        spec, dino = ClipSpec(params.clip_model, params.clip_pretrained), load_dino(params.dino_path)
    clip = load_clip(spec, device=device)
    dino = dino.to(device).eval().requires_grad_(False)
    return MetricModels(clip=clip, tokenizer=open_clip.get_tokenizer(spec.model), dino=dino,
                        dino_transform=dino_transform(dino.config.image_size), device=device,
                        random_weights=params.profile == "tiny")


@torch.inference_mode()
def clip_image_embeddings(models: MetricModels, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.stack([models.clip.preprocess(image.convert("RGB")) for image in images]).to(models.device)
    return F.normalize(models.clip.model.encode_image(pixels).float(), dim=-1)  # (N, D)


@torch.inference_mode()
def clip_text_embeddings(models: MetricModels, texts: list[str]) -> torch.Tensor:
    tokens = models.tokenizer(texts).to(models.device)
    return F.normalize(models.clip.model.encode_text(tokens).float(), dim=-1)  # (N, D)


@torch.inference_mode()
def dino_embeddings(models: MetricModels, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.stack([models.dino_transform(image.convert("RGB")) for image in images]).to(models.device)
    return F.normalize(models.dino(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)  # (N, D) CLS


__all__ = ["MetricModels", "clip_image_embeddings", "clip_text_embeddings", "dino_embeddings", "dino_transform",
           "load_dino", "load_metric_models", "random_dino"]

"""Building the open_clip image encoder of the ``embed`` stage from params, offline.

Three profiles (``embed.profile``):

- ``tiny``: ``cc-tiny-ViT``, a small ViT CLIP registered with open_clip from
  ``model_configs/cc-tiny-ViT.json`` (same architecture family as ViT-H-14), randomly
  initialised from a fixed seed. Its embeddings are meaningless; it exists for tests and the
  sample run, and is logged as random.
- ``sd15``: ViT-H-14 with the laion2b_s32b_b79k weights (the image tower IP-Adapter uses with
  SD1.5), from the Hugging Face or open_clip download cache.
- ``named``: ``embed.model`` with ``embed.pretrained``, an open_clip tag or a local checkpoint file.

Weights are looked up before open_clip is called, so a missing checkpoint fails with a message
naming the file and how to get it, not with a network error (HF_HUB_OFFLINE=1 here).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from flows.runtime import configure

configure()  # HF_HUB_OFFLINE must be set before huggingface_hub is imported

import open_clip  # noqa: E402
import torch  # noqa: E402

from flows.config.params import EmbedParams  # noqa: E402
from flows.errors import UserFacingError  # noqa: E402

log = logging.getLogger(__name__)

TINY_MODEL = "cc-tiny-ViT"
TINY_SEED = 0
SD15_MODEL = "ViT-H-14"
SD15_PRETRAINED = "laion2b_s32b_b79k"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


class MissingCheckpointError(UserFacingError, FileNotFoundError):
    """Model weights that are not on this machine; the message says what and how to get them."""


@dataclass(frozen=True)
class ClipSpec:
    """Which open_clip model to build and where its weights come from."""

    model: str  # open_clip architecture name, e.g. ViT-H-14
    pretrained: str | None  # open_clip pretrained tag, a checkpoint file, or None for random init
    seed: int = TINY_SEED  # seeds the random init when pretrained is None

    @property
    def model_id(self) -> str:
        """Stored with every embedding: ``<model>:<tag or checkpoint path>`` or ``<model>:random-seed<n>``."""
        return f"{self.model}:{self.pretrained if self.pretrained else f'random-seed{self.seed}'}"


@dataclass
class LoadedClip:
    """A ready image encoder: eval mode, on its device, with the model's own eval transform."""

    model: torch.nn.Module
    preprocess: Callable  # PIL image -> (3, S, S) float tensor: the model's resize, crop, mean/std
    model_id: str
    dim: int  # embedding width
    image_size: int  # S, the model's input side in pixels
    random_weights: bool  # True when no checkpoint was loaded


def register_tiny_config() -> None:
    """Add ``cc-tiny-ViT`` to open_clip's architecture registry (idempotent)."""
    if TINY_MODEL not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def spec_for(params: EmbedParams) -> ClipSpec:
    """The model an ``embed`` params block asks for."""
    if params.profile == "tiny":
        return ClipSpec(TINY_MODEL, None)
    if params.profile == "sd15":
        if (params.model, params.pretrained) != (SD15_MODEL, SD15_PRETRAINED):
            log.warning("embed.profile sd15 uses %s:%s; embed.model/pretrained (%s:%s) are ignored",
                        SD15_MODEL, SD15_PRETRAINED, params.model, params.pretrained)
        return ClipSpec(SD15_MODEL, SD15_PRETRAINED)
    return ClipSpec(params.model, params.pretrained)


def check_weights(spec: ClipSpec, *, cache_dir: str | None = None) -> str | None:
    """The local file that holds ``spec``'s weights (None for random init); raise if absent.

    ``cache_dir`` is open_clip's ``cache_dir`` (default: the Hugging Face hub cache for
    hub-hosted tags, ~/.cache/clip for URL-hosted ones).
    """
    register_tiny_config()
    if spec.model not in open_clip.list_models():
        raise MissingCheckpointError(
            f"embed: {spec.model!r} is not an open_clip architecture (open_clip.list_models() lists them)")
    if spec.pretrained is None:
        return None
    if os.path.isfile(spec.pretrained):
        return spec.pretrained
    tag_cfg = open_clip.get_pretrained_cfg(spec.model, spec.pretrained)
    if not tag_cfg:
        if spec.pretrained.endswith(CHECKPOINT_SUFFIXES) or os.sep in spec.pretrained:
            raise MissingCheckpointError(
                f"embed: checkpoint file {spec.pretrained} (embed.pretrained) does not exist. Put an "
                f"open_clip state dict for {spec.model} there, or set embed.pretrained to a tag of "
                f"{spec.model}: {open_clip.list_pretrained_tags_by_model(spec.model)}")
        raise MissingCheckpointError(
            f"embed: {spec.pretrained!r} is neither a file nor a pretrained tag of {spec.model}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(spec.model)}")
    return _cached_tag_file(spec, tag_cfg, cache_dir)


def _cached_tag_file(spec: ClipSpec, tag_cfg: dict, cache_dir: str | None) -> str:
    """Find a tag's weights in the caches open_clip downloads to, without any network."""
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants, try_to_load_from_cache

        # open_clip's own rule: "org/repo/" means the default file, "org/repo/file" that file;
        # a .safetensors twin is preferred when cached.
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        filename = filename or open_clip.constants.HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == open_clip.constants.HF_WEIGHTS_NAME:
            candidates.insert(0, open_clip.constants.HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        hub_cache = cache_dir or constants.HF_HUB_CACHE
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name, cache_dir=hub_cache)
            if isinstance(found, str):
                return found
        raise MissingCheckpointError(
            f"embed: weights of {spec.model}:{spec.pretrained} are not in the Hugging Face cache "
            f"{hub_cache} (looked for {repo_id}/{' or '.join(candidates)}), and this machine has no "
            f"network. On a machine with network run `hf download {repo_id} {candidates[0]}` and copy "
            f"the cache folder here (or set HF_HUB_CACHE to it), or set embed.profile: named with "
            f"embed.model: {spec.model} and embed.pretrained: <local checkpoint file>.")
    url = tag_cfg.get("url", "")
    url_cache = cache_dir or os.path.expanduser("~/.cache/clip")
    path = os.path.join(url_cache, os.path.basename(url))
    if url and os.path.isfile(path):
        return path
    raise MissingCheckpointError(
        f"embed: weights of {spec.model}:{spec.pretrained} are not at {path}, and this machine has no "
        f"network. Download {url or 'them'} there on a machine with network, or set embed.profile: named "
        f"with embed.model: {spec.model} and embed.pretrained: <local checkpoint file>.")


def load_clip(spec: ClipSpec, *, device: str | torch.device = "cpu", cache_dir: str | None = None) -> LoadedClip:
    """Build ``spec`` through open_clip.create_model_and_transforms, as for any real checkpoint."""
    check_weights(spec, cache_dir=cache_dir)
    random_weights = spec.pretrained is None
    with torch.random.fork_rng(devices=[]):
        # Built on the CPU from a fixed seed, so a random model is the same on every device.
        torch.manual_seed(spec.seed)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=spec.pretrained, device="cpu", cache_dir=cache_dir)
    if random_weights:
        log.warning("embed: %s has RANDOM weights (seed %d): its embeddings are meaningless; "
                    "use embed.profile sd15 or named for real ones", spec.model, spec.seed)
    model = model.to(device).eval().requires_grad_(False)
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    image_size = max(size) if isinstance(size, (tuple, list)) else int(size)
    with torch.inference_mode():
        dim = model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device)).shape[-1]
    return LoadedClip(model=model, preprocess=preprocess, model_id=spec.model_id, dim=int(dim),
                      image_size=image_size, random_weights=random_weights)


def save_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Save ``model`` as open_clip loads a ``pretrained=<file>``: a plain state dict (torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path

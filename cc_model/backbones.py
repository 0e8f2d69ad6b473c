"""The frozen backbones: UNet, VAE, noise scheduler, CLIP text encoder + tokenizer, CLIP image encoder.

Two profiles (``model.backbone.profile``):

- ``tiny``: random small configs of the same architectures, built in code (logged loudly).
- ``sd15``: Stable Diffusion 1.5 (diffusers folder layout) and a CLIP image encoder (transformers
  folder layout), read from local folders or the Hugging Face cache, never the network. A missing
  file raises :class:`BackboneNotFoundError` naming it and the command that fetches it.

The image encoder is transformers' ``CLIPVisionModel`` rather than open_clip: it returns every
layer's hidden states with ``output_hidden_states=True`` (open_clip needs hooks or a per-model
``forward_intermediates``), IP-Adapter ships its ViT-H/14 encoder in exactly this folder format
(``h94/IP-Adapter/models/image_encoder``), and tiny configs save/load with the same
``save_pretrained``/``from_pretrained`` calls as the real one.

The tokenizer is built offline from the BPE vocabulary that open_clip ships; transformers returns a
2-token tokenizer when offline loading quietly fails, so the vocabulary size is always asserted.
"""

from __future__ import annotations

import gzip
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from flows.errors import UserFacingError
from flows.runtime import configure

configure()  # HF_HUB_OFFLINE=1 etc. before diffusers/transformers read their settings

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from cc_model.architectures import CLIP_VOCAB_SIZE, SCHEDULER_CONFIG, sd15_configs, tiny_configs  # noqa: E402, F401
from cc_model.config import IP_ADAPTER_REPO, SD15_REPO, BackboneParams  # noqa: E402

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneNotFoundError(UserFacingError, FileNotFoundError):
    """Real weights are not on disk; the message names what is missing and how to get it."""


@dataclass
class Backbones:
    """The frozen parts of the model, all in eval mode with requires_grad False."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDPMScheduler
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    image_encoder: CLIPVisionModel
    profile: str  # "tiny", "sd15" or "sd15-random"
    files: tuple[Path, ...] = ()  # the weight files read (sd15): what a training state was made with
    seed: int | None = None  # the seed of random weights (tiny, sd15-random); None for real weights


# --------------------------------------------------------------------------- tokenizer


def clip_tokenizer_from_open_clip(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's BPE tokenizer built from open_clip's bundled vocabulary, no download."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # Same slice and vocabulary order as open_clip's SimpleTokenizer (and OpenAI's CLIP).
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tokenizer.model_max_length = model_max_length
    return check_tokenizer(tokenizer, str(path))


def check_tokenizer(tokenizer: CLIPTokenizer, source: str) -> CLIPTokenizer:
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise BackboneNotFoundError(
            f"{source}: tokenizer has {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE} "
            "(transformers returns a 2-token tokenizer when offline loading fails)"
        )
    return tokenizer


def match_text_encoder_length(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, source: str) -> CLIPTokenizer:
    """The tokenizer pads to the text encoder's length: set it when the folder gives none, refuse a different one.

    A tokenizer folder with only vocab.json + merges.txt (no tokenizer_config.json) loads with
    transformers' placeholder model_max_length of 1e30, and tokenize() would pad to that.
    """
    positions = text_encoder.config.max_position_embeddings
    length = getattr(tokenizer, "model_max_length", None)
    if length is None or length > 1_000_000:  # absent: transformers' VERY_LARGE_INTEGER placeholder
        log.info("%s: no model_max_length, using the text encoder's max_position_embeddings %d", source, positions)
        tokenizer.model_max_length = length = positions
    if length != positions:
        raise ValueError(
            f"{source}: tokenizer model_max_length {length} != text encoder max_position_embeddings {positions} "
            "(tokenizer and text encoder come from different models?)"
        )
    return tokenizer


# --------------------------------------------------------------------------- random weights


def build_random_backbones(configs: dict[str, dict], *, seed: int = 0, profile: str = "tiny") -> Backbones:
    """Random-initialised backbones from config dicts (see tiny_configs / sd15_configs)."""
    log.warning("profile %s: backbones have RANDOM weights (built in code, seed %d)", profile, seed)
    torch.manual_seed(seed)
    backbones = Backbones(
        unet=UNet2DConditionModel(**configs["unet"]),
        vae=AutoencoderKL(**configs["vae"]),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text"])),
        tokenizer=clip_tokenizer_from_open_clip(configs["text"]["max_position_embeddings"]),
        image_encoder=CLIPVisionModel(CLIPVisionConfig(**configs["vision"])),
        profile=profile,
        seed=seed,
    )
    return freeze(backbones)


def freeze(backbones: Backbones) -> Backbones:
    for module in (backbones.unet, backbones.vae, backbones.text_encoder, backbones.image_encoder):
        module.requires_grad_(False)
        module.eval()
    return backbones


# --------------------------------------------------------------------------- real weights

SD15_FILES = {
    "unet": ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
    "vae": ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"],
    "text_encoder": ["text_encoder/config.json", "text_encoder/model.safetensors"],
    "scheduler": ["scheduler/scheduler_config.json"],
}
TOKENIZER_FILE_SETS = (["tokenizer/vocab.json", "tokenizer/merges.txt"], ["tokenizer/tokenizer.json"])


def _looks_like_repo(path_or_repo: str) -> bool:
    return path_or_repo.count("/") == 1 and not path_or_repo.startswith((".", "/", "~"))


def _download_hint(path_or_repo: str, repo: str, include: str = "") -> str:
    """How to fetch what ``path_or_repo`` should hold: a repo id into the HF cache, a local folder with --local-dir."""
    if path_or_repo == repo:
        return f"Get it with `hf download {repo}{include}` (older hubs: `huggingface-cli download {repo}{include}`)"
    local = f"`hf download {repo}{include} --local-dir {shlex.quote(str(Path(path_or_repo).expanduser()))}`"
    if _looks_like_repo(path_or_repo) and _valid_repo_id(path_or_repo):
        return f"Get it with `hf download {path_or_repo}{include}` if it is a repo id, or {local} if it is a local folder"
    return f"Get it with {local} (older hubs: `huggingface-cli download` takes the same arguments)"


def _valid_repo_id(path_or_repo: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path_or_repo)
    except HFValidationError:
        return False
    return True


def _resolve_root(path_or_repo: str, what: str, repo: str, include: str = "") -> Path:
    """A local folder as given, or the cached snapshot of a Hugging Face repo id (no network).

    ``repo`` is the repo the weights come from, named in the error's download command.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if _looks_like_repo(path_or_repo):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(path_or_repo, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):  # not cached, or not a repo id (e.g. a space in it)
            pass
    raise BackboneNotFoundError(
        f"{what}: {path_or_repo!r} is neither a local folder nor a repo in the Hugging Face cache. "
        f"{_download_hint(path_or_repo, repo, include)}, or point params.yaml at a local folder."
    )


def _require_files(root: Path, required: list[str], alternatives: tuple[list[str], ...], what: str, hint: str):
    missing = [f for f in required if not (root / f).is_file()]
    if alternatives and not any(all((root / f).is_file() for f in alt) for alt in alternatives):
        missing.append(" + ".join(alternatives[0]) + " (or " + " + ".join(alternatives[-1]) + ")")
    if missing:
        raise BackboneNotFoundError(
            f"{what}: {root} lacks {', '.join(missing)}. Only safetensors weights are read. "
            f"{hint}, or copy a complete folder there."
        )


def load_sd15_backbones(params: BackboneParams) -> Backbones:
    """SD1.5 + CLIP image encoder from local folders or the HF cache; clear error when missing."""
    sd_root = _resolve_root(params.sd15_path, "model.backbone.sd15_path (Stable Diffusion 1.5)", SD15_REPO)
    sd_files = [f for files in SD15_FILES.values() for f in files]
    _require_files(
        sd_root, sd_files, TOKENIZER_FILE_SETS, "Stable Diffusion 1.5", _download_hint(params.sd15_path, SD15_REPO)
    )
    sub = params.image_encoder_subfolder.strip("/")
    include = f" --include '{sub}/*'" if sub else ""
    image_root = _resolve_root(
        params.image_encoder_path, "model.backbone.image_encoder_path", IP_ADAPTER_REPO, include
    )
    image_dir = image_root / sub if sub else image_root
    sub_prefix = f"{sub}/" if sub else ""
    _require_files(
        image_root,
        [f"{sub_prefix}config.json", f"{sub_prefix}model.safetensors"],
        (),
        "CLIP image encoder",
        _download_hint(params.image_encoder_path, IP_ADAPTER_REPO, include),
    )
    tokenizer = check_tokenizer(
        CLIPTokenizer.from_pretrained(sd_root / "tokenizer", local_files_only=True), str(sd_root / "tokenizer")
    )
    # float32 explicitly: transformers 5 defaults to dtype="auto" and takes config.json's dtype, and
    # IP-Adapter's image encoder says "torch_dtype": "float16" (everything else would stay fp32 and the
    # first step fails with "mat1 and mat2 must have the same dtype"). cast_frozen makes bf16 later.
    # diffusers (0.42) and transformers (5) both take ``dtype``.
    kw = dict(local_files_only=True, use_safetensors=True, dtype=torch.float32)
    backbones = Backbones(
        unet=UNet2DConditionModel.from_pretrained(sd_root / "unet", **kw),
        vae=AutoencoderKL.from_pretrained(sd_root / "vae", **kw),
        scheduler=DDPMScheduler.from_pretrained(sd_root / "scheduler", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(sd_root / "text_encoder", **kw),
        tokenizer=tokenizer,
        image_encoder=CLIPVisionModel.from_pretrained(image_dir, **kw),
        profile="sd15",
        files=tuple(sorted({sd_root / f for f in sd_files if (sd_root / f).is_file()}))
        + (image_dir / "model.safetensors",),
    )
    match_text_encoder_length(backbones.tokenizer, backbones.text_encoder, str(sd_root / "tokenizer"))
    return freeze(backbones)


def save_backbones(backbones: Backbones, sd15_dir: Path, image_encoder_dir: Path) -> None:
    """Write backbones in the real on-disk layouts (diffusers SD folder + transformers image encoder)."""
    sd15_dir, image_encoder_dir = Path(sd15_dir), Path(image_encoder_dir)
    backbones.unet.save_pretrained(sd15_dir / "unet")
    backbones.vae.save_pretrained(sd15_dir / "vae")
    backbones.scheduler.save_pretrained(sd15_dir / "scheduler")
    backbones.text_encoder.save_pretrained(sd15_dir / "text_encoder")
    backbones.tokenizer.save_pretrained(sd15_dir / "tokenizer")
    backbones.image_encoder.save_pretrained(image_encoder_dir)


def load_backbones(params: BackboneParams) -> Backbones:
    """The backbones of ``params.profile``."""
    if params.profile == "tiny":
        return build_random_backbones(tiny_configs(), seed=params.tiny_seed, profile="tiny")
    return load_sd15_backbones(params)


# --------------------------------------------------------------------------- helpers


def clip_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> CLIP-normalised (B, 3, S, S) for the image encoder."""
    images = F.interpolate(images, size=(image_size, image_size), mode="bicubic", align_corners=False)
    # from host lists, copied without waiting (new_tensor's copy would wait for all queued work)
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype).to(images.device, non_blocking=True).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype).to(images.device, non_blocking=True).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean) / std


__all__ = [
    "BackboneNotFoundError",
    "Backbones",
    "build_random_backbones",
    "clip_pixels",
    "clip_tokenizer_from_open_clip",
    "load_backbones",
    "load_sd15_backbones",
    "save_backbones",
    "sd15_configs",
    "tiny_configs",
]

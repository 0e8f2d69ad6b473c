"""Building and loading segment-anything (SAM) models: architectures are data, one loader.

``SamSpec`` holds every size that ``segment_anything.build_sam`` hard-codes, so the official
ViT-H/L/B and the ``tiny`` test model are the same code with different numbers. Real weights
are the official state-dict files (``sam_vit_h_4b8939.pth``, ...); nothing is downloaded.
A tiny model saved with :func:`save_sam` loads through :func:`load_sam` exactly like a real one.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling import image_encoder as sam_image_encoder

from flows.config.params import SegmentParams
from flows.errors import UserFacingError

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "SAM profile 'tiny' uses RANDOM weights (seed {seed}): its masks are meaningless; "
    "use it for tests and the sample pipeline only (segment.sam_profile: sam for real masks)"
)
CHECKPOINT_URLS = {
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
}


class SamCheckpointError(UserFacingError, RuntimeError):
    """A SAM checkpoint that is missing or does not match the architecture asked for."""


@dataclass(frozen=True, kw_only=True)
class SamSpec:
    """One SAM architecture; the defaults are those of segment_anything.build_sam."""

    name: str  # vit_h, vit_l, vit_b or tiny; part of the model id
    encoder_embed_dim: int  # ViT width
    encoder_depth: int  # ViT blocks
    encoder_num_heads: int  # attention heads per ViT block
    encoder_global_attn_indexes: tuple[int, ...]  # blocks with global attention; the rest are windowed
    image_size: int = 1024  # the encoder's square input side (longest image side is resized to it)
    patch_size: int = 16  # image embedding side = image_size // patch_size
    window_size: int = 14  # windowed-attention side, in patches
    prompt_embed_dim: int = 256  # width of prompt tokens, image embedding channels and the decoder
    mask_in_chans: int = 16  # hidden channels of the mask-prompt downscaler
    decoder_depth: int = 2  # TwoWayTransformer blocks
    decoder_mlp_dim: int = 2048  # TwoWayTransformer MLP width
    decoder_num_heads: int = 8  # TwoWayTransformer heads (prompt_embed_dim // 2 must divide by it)
    iou_head_hidden_dim: int = 256  # width of the IoU-prediction MLP

    @property
    def embedding_side(self) -> int:
        return self.image_size // self.patch_size


SPECS = {
    "vit_h": SamSpec(name="vit_h", encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                     encoder_global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": SamSpec(name="vit_l", encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": SamSpec(name="vit_b", encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     encoder_global_attn_indexes=(2, 5, 8, 11)),
    # The real architecture at toy sizes: 256 px input, 16x16 image embedding, 64 px low-res masks.
    "tiny": SamSpec(name="tiny", encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2,
                    encoder_global_attn_indexes=(1,), image_size=256, window_size=4,
                    prompt_embed_dim=32, mask_in_chans=8, decoder_mlp_dim=64, decoder_num_heads=2,
                    iou_head_hidden_dim=32),
}
TINY_SEED = 0


@dataclass(frozen=True)
class LoadedSam:
    """A SAM model in eval mode with what the stage records about it."""

    model: Sam
    spec: SamSpec
    model_id: str  # written to masks.parquet: architecture and weights
    random_weights: bool  # True: masks are meaningless


SAM_GET_REL_POS = sam_image_encoder.get_rel_pos  # the original, kept for the equivalence test


def get_rel_pos_on_device(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment_anything's ``get_rel_pos`` with its index tensor made on ``rel_pos``'s device.

    The original indexes a CUDA tensor with a CPU index, a blocking copy that makes the host
    wait for the GPU twice per ViT block, so the next batch cannot be queued while one
    computes. Same numbers; measured on an H100 (ViT-H, bf16 autocast): segment stage 0.77x
    -> 0.94x..1.0x the bare encoder, and the encoder itself 20 -> 21 img/s.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)  # (max_rel_dist, C)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # (q_size, k_size)
    return rel_pos[relative.long()]  # (q_size, k_size, C)


def build_sam(spec: SamSpec) -> Sam:
    """The SAM module for ``spec`` with PyTorch's default (random) initialisation, in eval mode."""
    sam_image_encoder.get_rel_pos = get_rel_pos_on_device  # module global read by every Attention block
    side = spec.embedding_side
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth, embed_dim=spec.encoder_embed_dim, img_size=spec.image_size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads, patch_size=spec.patch_size, qkv_bias=True,
            use_rel_pos=True, global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size, out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim, image_embedding_size=(side, side),
            input_image_size=(spec.image_size, spec.image_size), mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=spec.decoder_depth, embedding_dim=spec.prompt_embed_dim,
                                          mlp_dim=spec.decoder_mlp_dim, num_heads=spec.decoder_num_heads),
            transformer_dim=spec.prompt_embed_dim, iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_random_sam(spec: SamSpec, *, seed: int = TINY_SEED) -> LoadedSam:
    """``spec`` with random weights from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam(spec)
    log.warning(RANDOM_WEIGHTS_WARNING.format(seed=seed))
    return LoadedSam(model, spec, f"sam:{spec.name}:random-seed{seed}", random_weights=True)


def check_checkpoint(spec: SamSpec, checkpoint: str | Path) -> Path:
    """The checkpoint's path if the file is there, else SamCheckpointError saying where to get it."""
    path = Path(checkpoint)
    if not path.is_file():
        url = CHECKPOINT_URLS.get(spec.name, CHECKPOINT_URLS["vit_h"])
        raise SamCheckpointError(
            f"segment.sam_checkpoint: {path} not found: download the {spec.name} weights ({url}) to that "
            "path on a machine with network access, or set segment.sam_profile: tiny")
    return path


def load_sam(spec: SamSpec, checkpoint: str | Path) -> LoadedSam:
    """``spec`` with the weights of a SAM state-dict file (the official release format)."""
    path = check_checkpoint(spec, checkpoint)
    try:  # weights_only: a checkpoint never runs code here
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:  # a bad file; torch's own
        # message would suggest weights_only=False: unsafe, and wrong for a cut download
        first = (str(exc).splitlines() or [""])[0][:200]
        raise SamCheckpointError(
            f"{path} is not a readable PyTorch state dict ({type(exc).__name__}: {first}); a download may have "
            f"been cut short: fetch {CHECKPOINT_URLS.get(spec.name, CHECKPOINT_URLS['vit_h'])} again") from None
    model = build_sam(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise SamCheckpointError(f"{path} is not a SAM {spec.name} state dict: {first}") from None
    return LoadedSam(model, spec, f"sam:{spec.name}:{path.name}", random_weights=False)


def save_sam(model: Sam, path: str | Path) -> None:
    """Write ``model`` as a plain state dict, the format of the official checkpoints."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


def sam_for_params(params: SegmentParams) -> LoadedSam:
    """The model that ``segment.sam_profile`` names: tiny (random) or a real checkpoint."""
    if params.sam_profile == "tiny":
        return build_random_sam(SPECS["tiny"])
    return load_sam(SPECS[params.sam_model_type], params.sam_checkpoint)


def describe(spec: SamSpec) -> dict:
    """The spec as plain data, for logs and stats."""
    return asdict(spec)

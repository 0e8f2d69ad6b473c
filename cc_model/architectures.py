"""Backbone architectures as data: the tiny test configs and SD1.5-size configs (for random-weight
benchmarks), as keyword dicts for diffusers/transformers constructors. No weights here."""

from __future__ import annotations

CLIP_VOCAB_SIZE = 49408

SCHEDULER_CONFIG = dict(  # SD1.5's training noise schedule
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def tiny_configs() -> dict[str, dict]:
    """Small configs with SD1.5's block structure (attention-free last down / first up block)."""
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=2,
            norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=32,
        ),
        "text": dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
    }


def sd15_configs(image_encoder: str = "vit-h") -> dict[str, dict]:
    """SD1.5-size configs (for random-weight benchmarks): UNet, VAE, CLIP ViT-L/14 text, ViT-H or L image."""
    vision = {
        # LAION's ViT-H/14 (IP-Adapter's image encoder) uses GELU; OpenAI's ViT-L/14 quick-GELU
        "vit-h": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      hidden_act="gelu"),
        "vit-l": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      hidden_act="quick_gelu"),
    }[image_encoder]
    return {
        # diffusers' UNet2DConditionModel defaults are SD1.5's, except the text width (768, not 1280).
        "unet": dict(sample_size=64, cross_attention_dim=768),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ),
        "text": dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        "vision": dict(vision, image_size=224, patch_size=14),
    }

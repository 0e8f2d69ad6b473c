"""A synthetic TrainBatch (open_clip's synthetic-dataset habit): real training steps on CPU in tests
and benchmarks, with no data on disk. Positives are noisy copies of their references, so the
appearance similarities r_ij have the structure real data gives (high within a pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cc_model.model import CustomContrastModel, TrainBatch

NOUNS = ("dog", "cup", "toy", "backpack", "vase", "cat", "boot", "clock")


def appearance_similarity(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) appearance embeddings psi(x^) -> (N, N) cosine similarities r_ij."""
    z = F.normalize(embeddings.float(), dim=-1)
    return z @ z.T


def synthetic_batch(
    model: CustomContrastModel, *, batch_size: int, generator: torch.Generator, device="cpu", dtype=torch.float32
) -> TrainBatch:
    b, g = batch_size, generator
    size = model.image_encoder.config.image_size
    channels, latent = model.unet.config.in_channels, model.unet.config.sample_size
    references = torch.randn(b, 3, size, size, generator=g)
    positives = references + 0.5 * torch.randn(b, 3, size, size, generator=g)
    captions = [f"a photo of {model.params.placeholder_token} {NOUNS[i % len(NOUNS)]}" for i in range(b)]
    masks = torch.zeros(b, 1, 4 * latent, 4 * latent)
    for i in range(b):  # one box per sample, at least a quarter of the side
        y0, x0 = torch.randint(0, 2 * latent, (2,), generator=g).tolist()
        h, w = torch.randint(latent, 2 * latent, (2,), generator=g).tolist()
        masks[i, :, y0 : y0 + h, x0 : x0 + w] = 1.0
    embeddings = torch.randn(b, 16, generator=g)
    embeddings = torch.cat([embeddings, embeddings + 0.3 * torch.randn(b, 16, generator=g)])  # (2B, 16)
    batch = TrainBatch(
        reference_pixels=references,
        input_ids=model.tokenize(captions),
        noisy_latents=torch.randn(b, channels, latent, latent, generator=g),
        timesteps=torch.randint(0, model.scheduler.config.num_train_timesteps, (b,), generator=g),
        target=torch.randn(b, channels, latent, latent, generator=g),
        masks=masks,
        positive_pixels=positives,
        appearance_sim=appearance_similarity(embeddings),
    )
    return move_batch(batch, device=device, dtype=dtype)


def move_batch(batch: TrainBatch, *, device, dtype=torch.float32) -> TrainBatch:
    """Floating tensors to ``dtype`` and everything but the captions to ``device``.

    ``input_ids`` stay in host memory, as the training loader gives them: the model makes its
    data-dependent decisions there (CustomContrastModel.forward) and moves them itself.
    """
    moved = {}
    for name, value in vars(batch).items():
        if isinstance(value, torch.Tensor) and name != "input_ids":
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        moved[name] = value
    return TrainBatch(**moved)


__all__ = ["appearance_similarity", "move_batch", "synthetic_batch"]

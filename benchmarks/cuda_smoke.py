"""Smoke check of the bf16 CUDA paths of training and generation, with the tiny models.

Tests run on the CPU only; this runs what they cannot: ``cc_model.training.train_model`` on the
sample's export shards with bf16 frozen weights under autocast (DataLoader workers, pinned
memory), then ``cc_model.inference.generate`` with subject location from the checkpoint it
wrote, and prints one JSON line. It is a check, not a benchmark: it fails (exit 1) on an error
or a non-finite value.

    python benchmarks/cuda_smoke.py --device cuda   # needs data/export, data/embed, data/similarity
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow  # noqa: E402
import torch  # noqa: E402

from cc_model.checkpoint import load_model  # noqa: E402
from cc_model.config import SamplingParams, TrainParams  # noqa: E402
from cc_model.inference import generate  # noqa: E402
from cc_model.model import cast_frozen  # noqa: E402
from cc_model.data import dataset_for  # noqa: E402
from cc_model.training import train_model, training_batch  # noqa: E402
from flows.config.params import Params  # noqa: E402


def count_syncs(model, device: torch.device, data: Path, params: Params) -> dict:
    """Host-device syncs in one training step: a loader batch of the sample's export in pinned
    memory made into a TrainBatch (cc_model.training.training_batch: VAE latents, noise, CLIP
    pixels), then forward and backward. CUDA's sync debug mode warns at each sync. The training
    loop's own read of the loss terms after the forward is not part of this step."""
    dataset = dataset_for(model, data / "export", "train", embeddings=data / "embed" / "embeddings.parquet",
                          background_rgb=params.embed.background_rgb)
    loaded = dataset.collate([dataset[i] for i in range(2)])
    cuda = device.type == "cuda"
    if cuda:
        loaded = {name: value.pin_memory() for name, value in loaded.items()}
    model.train()
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            batch = training_batch(model, loaded, device=device, dtype=dtype, generator=generator)
            terms = model(batch, generator=generator)
        terms["total"].backward()

    step()  # warm-up: first-time allocations
    if not cuda:  # the CPU smoke test runs the step; only CUDA can count syncs
        step()
        return {"count": None}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    return {"count": len(messages), "first": messages[:5]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data", default=str(ROOT / "data"), help="folder with export/, embed/, similarity/")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    data, device = Path(args.data), torch.device(args.device)
    out = Path(tempfile.mkdtemp(prefix="cuda-smoke-"))
    params = Params(train=TrainParams(max_steps=args.steps, batch_size=4, num_workers=2, device=args.device,
                                      avoid_near_duplicates=False, out_dir=str(out / "train")))
    start = time.perf_counter()
    stats = train_model(params, export_dir=data / "export", embeddings=data / "embed" / "embeddings.parquet",
                        near_duplicates=data / "similarity" / "near_duplicates.parquet")
    train_s = time.perf_counter() - start

    model = load_model(out / "train" / "checkpoint").to(device)
    if device.type == "cuda":
        cast_frozen(model, torch.bfloat16)
    size = model.image_encoder.config.image_size
    references = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    generated = generate(model, references.to(model.image_encoder.dtype), ["a photo of sks cup", "a sks dog"],
                         params=SamplingParams(steps=4))
    generate_s = time.perf_counter() - start
    images = generated.images
    try:
        syncs = count_syncs(model, device, data, params)
    except Exception as exc:  # noqa: BLE001 - a diagnosis, not the check: report it and go on
        syncs = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_steps": stats["steps"], "train_loss_total": stats["loss_last_steps"].get("total"),
        "train_s": round(train_s, 2), "frozen_dtype": str(model.unet.dtype),
        "images": list(images.shape), "images_finite": bool(torch.isfinite(images).all()),
        "location_fraction": [round(float(m.mean()), 3) for m in generated.location],
        "generate_s": round(generate_s, 2), "torch": torch.__version__, "pyarrow": pyarrow.__version__,
        "syncs_in_train_step": syncs,
    }
    print(json.dumps(result))
    ok = result["images_finite"] and math.isfinite(result["train_loss_total"] or float("nan"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

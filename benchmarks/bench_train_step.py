"""Benchmark: a CustomContrast training step against a plain IP-Adapter-style step of the same size.

Both steps use the same model class on identical random backbones, batch size, dtype and device,
and are timed interleaved in one process (forward + backward + AdamW on the trainable weights;
the batch, i.e. VAE latents, noise and tokenized captions, is prepared beforehand for both):

- ``cc``: the configured model (default: every paper component on: K=3 image layers, visual +
  textual Q-formers, TV fusion, S+ injection through B*l text-encoder sequences, positives through
  the image encoder and textual Q-former, CSCL, MACL, localisation maps in the layers
  model.loc_min_downsample selects: by default all but the full-resolution ones).
- ``baseline``: IP-Adapter-plus style: penultimate image layer only, a visual Q-former (Resampler)
  of the same depth and m, decoupled cross-attention with SDPA everywhere, LDM loss only, plain
  caption through the text encoder once per sample.

``ratio`` = median over ``--repeats`` of (cc block time / baseline block time), each block
``--steps`` steps, the two blocks back to back. ``--ladder`` also times the paper's ablation
presets (Tables 3-4) against the same baseline, one variant alive beside it at a time.

    python benchmarks/bench_train_step.py --profile tiny --device cpu --dtype fp32 --batch 4 --steps 5
    python benchmarks/bench_train_step.py --profile sd15-random --device cuda --dtype bf16 --batch 16 --steps 10

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cc_model.backbones import build_random_backbones, sd15_configs, tiny_configs  # noqa: E402
from cc_model.config import ABLATION_PRESETS, AblationParams, ModelParams, TrainParams  # noqa: E402
from cc_model.model import CustomContrastModel, cast_frozen  # noqa: E402
from cc_model.synthetic import synthetic_batch  # noqa: E402
from cc_model.training import make_optimizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(profile: str, params: ModelParams, device: str, dtype: torch.dtype, image_encoder: str,
          train: TrainParams):
    configs = tiny_configs() if profile == "tiny" else sd15_configs(image_encoder)
    with torch.device(device):  # random init directly on the device (SD1.5 size on CPU takes a while)
        backbones = build_random_backbones(configs, seed=0, profile=profile)
        model = CustomContrastModel(backbones=backbones, params=params, train=train)
    model.to(device).eval()  # eval: no conditioning dropout, every step does the full work
    if dtype != torch.float32:
        cast_frozen(model, dtype)
    return model


def make_step(model, batch, dtype, device, mark=lambda phase: None):
    """One training step as a closure; ``mark(phase)`` is called as the backward and the optimizer start."""
    optimizer = make_optimizer(model.trainable_named_parameters().values(), lr=1e-5, device=torch.device(device))
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )

    def step():
        with autocast:
            terms = model(batch)
        mark("backward")
        terms["total"].backward()
        mark("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_block(step, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def variants(args, m: int) -> dict[str, ModelParams]:
    base = ModelParams()
    if args.loc_min_downsample is not None:
        base = dataclasses.replace(base, loc_min_downsample=args.loc_min_downsample)
    base = dataclasses.replace(base, mfi=dataclasses.replace(base.mfi, num_visual_tokens=m, depth=args.depth))
    baseline = dataclasses.replace(
        base,
        mfi=dataclasses.replace(base.mfi, num_image_layers=1),  # the penultimate layer only
        ablation=AblationParams(textual_qformer=False, tv_fusion=False, cscl=False, macl=False, localisation=False),
    )
    out = {"baseline": baseline, "cc": base}
    if args.ladder:
        for name, ablation in ABLATION_PRESETS.items():
            if name != "id5_full":  # that is "cc"
                out[name] = dataclasses.replace(base, ablation=ablation)
        out["id5_no_loc"] = dataclasses.replace(
            base, ablation=dataclasses.replace(ABLATION_PRESETS["id5_full"], localisation=False)
        )
    return out


def add_variant_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``variants`` and ``build`` read (shared with flops_train_step.py)."""
    parser.add_argument("--image-encoder", choices=["vit-h", "vit-l"], default="vit-h")
    parser.add_argument("--num-visual-tokens", type=int, default=None, help="m; default 16 (4 for tiny)")
    parser.add_argument("--depth", type=int, default=4, help="Q-former depth (paper: 4)")
    parser.add_argument("--loc-min-downsample", type=int, default=None,
                        help="default: model.loc_min_downsample's default; 1 = localisation maps in every layer")
    parser.add_argument("--ladder", action="store_true", help="also run the ablation presets")


def add_run_arguments(parser: argparse.ArgumentParser, *, batch: int, steps: int, steps_help: str) -> None:
    """Where and how the steps run: --profile, --device, --dtype, --batch, --steps, --warmup
    (shared with profile_train_step.py)."""
    parser.add_argument("--profile", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after it is built")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, batch=4, steps=5, steps_help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per variant, interleaved")
    add_variant_arguments(parser)
    parser.add_argument("--compile-text-encoder", default=None, metavar="BACKEND",
                        help="train.compile_text_encoder for both models, e.g. inductor (default: eager)")
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    m = args.num_visual_tokens or (4 if args.profile == "tiny" else 16)
    cuda = args.device.startswith("cuda")

    def prepare(params):
        train = TrainParams(compile_text_encoder=args.compile_text_encoder)
        model = build(args.profile, params, args.device, dtype, args.image_encoder, train)
        batch = synthetic_batch(
            model, batch_size=args.batch, generator=torch.Generator().manual_seed(0), device=args.device, dtype=dtype
        )
        step = make_step(model, batch, dtype, args.device)
        for _ in range(args.warmup):
            step()
        return model, step

    def peak_of(step) -> tuple[float, float]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = time_block(step, args.steps, args.device)
        return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)

    all_params = variants(args, m)
    cc_params = all_params["cc"]
    baseline_model, baseline_step = prepare(all_params.pop("baseline"))
    out_ratio, times, memory, trainable, layers = {}, {"baseline": []}, {}, {}, len(baseline_model.layer_names)
    trainable["baseline"] = sum(p.numel() for p in baseline_model.trainable_named_parameters().values())
    for name, params in all_params.items():  # one variant alive beside the baseline at a time
        model, step = prepare(params)
        trainable[name] = sum(p.numel() for p in model.trainable_named_parameters().values())
        pairs = []
        for _ in range(args.repeats):  # interleaved: clock or load drift hits both alike
            base_s, base_mem = peak_of(baseline_step)
            var_s, var_mem = peak_of(step)
            pairs.append((base_s, var_s))
            memory["baseline"] = max(memory.get("baseline", 0.0), base_mem)
            memory[name] = max(memory.get(name, 0.0), var_mem)
        times["baseline"] += [b for b, _ in pairs]
        times[name] = [v for _, v in pairs]
        out_ratio[name] = statistics.median(v / b for b, v in pairs)
        print(f"# {name}: {statistics.median(times[name]):.4f} s/step, ratio {out_ratio[name]:.3f}", file=sys.stderr, flush=True)
        del model, step
        if cuda:
            torch.cuda.empty_cache()
    median = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "bench": "train_step",
        "profile": args.profile,
        "device": torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu"),
        "dtype": args.dtype,
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "cross_attention_layers": layers,
        "num_visual_tokens": m,
        "loc_min_downsample": cc_params.loc_min_downsample,
        "compile_text_encoder": args.compile_text_encoder,
        "baseline_step_s": round(median["baseline"], 5),
        "cc_step_s": round(median["cc"], 5),
        "ratio": round(out_ratio["cc"], 3),
        "baseline_samples_s": round(args.batch / median["baseline"], 2),
        "cc_samples_s": round(args.batch / median["cc"], 2),
        "trainable_params": trainable,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.ladder:
        out["ladder_ratio"] = {k: round(v, 3) for k, v in out_ratio.items()}
    if cuda:
        out["peak_mem_gib"] = {k: round(v, 2) for k, v in memory.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

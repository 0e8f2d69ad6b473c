"""Count the FLOPs of one training step: CustomContrast against the plain IP-Adapter-style step.

A companion to ``bench_train_step.py`` (same variants, same models, same synthetic batch), for
machines without a GPU: at SD1.5 size the step is dominated by matrix products, so the FLOP ratio
is the ratio a compute-bound GPU step approaches, and the breakdown shows where the extra work is.
Counting uses ``torch.utils.flop_counter.FlopCounterMode`` on a real step (forward + backward);
the CPU's fused attention op, which that counter does not know, is counted with its formulas.

Each variant is built, counted and freed in turn, so SD1.5 size fits in ~20 GB of RAM at batch 2.
FLOPs are linear in the batch except the B x B contrastive terms (negligible), so a small batch
gives the ratio of a large one.

    python benchmarks/flops_train_step.py --profile sd15-random --batch 2 --ladder
    python benchmarks/flops_train_step.py --profile tiny --batch 4

Prints one JSON line (and a readable table on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count  # noqa: E402

from bench_train_step import add_variant_arguments, build, make_step, variants  # noqa: E402
from cc_model.config import TrainParams  # noqa: E402
from cc_model.synthetic import synthetic_batch  # noqa: E402

aten = torch.ops.aten
TOP_LEVEL = ("unet", "text_encoder", "image_encoder", "mfi")  # the rest (losses, glue) is "other"


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def forward_by_module(counts: dict[str, dict]) -> dict[str, int]:
    """Forward FLOPs per top-level part of the model (module paths from the counter's tracker)."""
    out = {name: sum(counts.get(f"CustomContrastModel.{name}", {}).values()) for name in TOP_LEVEL}
    out["other"] = sum(counts.get("Global", {}).values()) - sum(out.values())
    return out


def count(model, batch) -> dict[str, object]:
    """FLOPs of one forward (with its per-part split) and of one full step (forward + backward)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as forward_counter:
        model(batch)  # grad mode on: the counter's module tracker needs autograd nodes
    step = make_step(model, batch, torch.float32, "cpu")
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as step_counter:
        step()
    forward = forward_counter.get_total_flops()
    total = step_counter.get_total_flops()
    return {"forward": forward, "backward": total - forward, "step": total,
            "forward_by_part": forward_by_module(forward_counter.get_flop_counts())}


def tflop(n: int) -> str:
    return f"{n / 1e12:8.3f}" if n >= 1e10 else f"{n / 1e9:7.2f}G"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    add_variant_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    m = args.num_visual_tokens or (4 if args.profile == "tiny" else 16)
    results = {}
    for name, params in variants(args, m).items():  # one model alive at a time
        start = time.perf_counter()
        model = build(args.profile, params, "cpu", torch.float32, args.image_encoder, TrainParams())
        batch = synthetic_batch(model, batch_size=args.batch, generator=torch.Generator().manual_seed(0))
        results[name] = count(model, batch)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        del model, batch
        print(f"# {name}: {results[name]['step'] / 1e12:.3f} TFLOP/step ({results[name]['seconds']} s)",
              file=sys.stderr, flush=True)

    base = results["baseline"]["step"]
    print(f"\n{'variant':<12} {'step TFLOP':>10} {'ratio':>6} | forward TFLOP by part: "
          + " ".join(f"{p:>13}" for p in (*TOP_LEVEL, "other")), file=sys.stderr)
    for name, r in results.items():
        parts = " ".join(f"{tflop(r['forward_by_part'][p]):>13}" for p in (*TOP_LEVEL, "other"))
        print(f"{name:<12} {tflop(r['step']):>10} {r['step'] / base:6.3f} | {'':22}{parts}", file=sys.stderr)
    out = {
        "bench": "train_step_flops",
        "profile": args.profile,
        "batch": args.batch,
        "num_visual_tokens": m,
        "loc_min_downsample": variants(args, m)["cc"].loc_min_downsample,
        "flop_ratio": round(results["cc"]["step"] / base, 3),
        "variants": {name: {**r, "ratio": round(r["step"] / base, 3)} for name, r in results.items()},
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

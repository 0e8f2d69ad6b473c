"""Where the CustomContrast training step spends its device time, next to the baseline step.

The same two models as ``bench_train_step.py`` (same builders and options), each profiled for
``--steps`` steps with torch.profiler after its warm-up. Per model, per step:

- ``wall_ms``: host clock, synchronised; ``busy_ms``: the device's kernel time (the sum of the
  kernels' durations: one stream, so busy = sum); ``idle_ms`` = wall - busy, the time the
  device waited for the host (launch overhead, host syncs);
- ``forward_ms``: device time inside the forward of each part (text encoder, image encoder,
  UNet, MFI encoder, the losses), from profiler ranges opened by forward hooks;
- ``backward_ms`` (autograd engine) and ``optimizer_ms`` (AdamW.step);
- ``top_ops``: the aten ops with the most self device time (their kernels).

``extra_ops`` lists the ops whose time grew most from the baseline to cc. On a CPU the same
numbers come from the CPU profiler (self CPU time), which makes only a smoke test.

    python benchmarks/profile_train_step.py --profile sd15-random --device cuda --dtype bf16 --batch 16 --steps 3
    python benchmarks/profile_train_step.py --profile tiny --device cpu --dtype fp32 --batch 2 --steps 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from bench_train_step import (DTYPES, add_run_arguments, add_variant_arguments, build, make_step,  # noqa: E402
                              sync, variants)
from cc_model.config import TrainParams  # noqa: E402
from cc_model.synthetic import synthetic_batch  # noqa: E402

RANGES = ("forward:", "Optimizer.step", "ProfilerStep")  # our ranges and torch's: not ops
PARTS = ("text_encoder", "image_encoder", "unet", "mfi", "cscl_loss", "macl_loss", "loc_loss", "ldm_loss")


def label_forwards(model) -> list:
    """Open a profiler range named ``forward:PART`` around each call of the model's parts."""
    handles = []
    for part in PARTS:
        module = getattr(model, part)
        ranges: list = []

        def enter(_module, _args, name=f"forward:{part}", ranges=ranges):
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        def leave(_module, _args, _out, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    return handles


def _ms(event, cuda: bool, self_time: bool) -> float:
    if cuda:
        value = event.self_device_time_total if self_time else event.device_time_total
    else:
        value = event.self_cpu_time_total if self_time else event.cpu_time_total
    return value / 1000  # microseconds -> ms


def profile_steps(step, steps: int, device: str) -> dict:
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = (time.perf_counter() - start) / steps * 1000
    events = prof.key_averages()
    per_step = {e.key: e for e in events}
    # Kernels are listed twice: as their own entries (device type CUDA) and inside the self
    # device time of the op that launched them. Busy time sums the kernels; top_ops the ops.
    self_ms = {e.key: _ms(e, cuda, True) / steps for e in events
               if e.device_type == DeviceType.CPU and not e.key.startswith(RANGES)}  # ops, not our ranges
    busy = (sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1000 / steps
            if cuda else sum(self_ms.values()))
    return {
        "wall_ms": round(wall, 2),
        "busy_ms": round(busy, 2),
        "idle_ms": round(wall - busy, 2) if cuda else None,
        "forward_ms": {k.split(":", 1)[1]: round(_ms(e, cuda, False) / steps, 2)
                       for k, e in per_step.items() if k.startswith("forward:")},
        "backward_ms": round(sum(_ms(e, cuda, False) for k, e in per_step.items()
                                 if k.startswith("autograd::engine::evaluate_function")) / steps, 2),
        "optimizer_ms": round(sum(_ms(e, cuda, False) for k, e in per_step.items()
                                  if k.startswith("Optimizer.step")) / steps, 2),
        "self_ms": self_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, batch=2, steps=3, steps_help="profiled steps per model")
    parser.add_argument("--top", type=int, default=15, help="ops listed per model")
    add_variant_arguments(parser)
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    m = args.num_visual_tokens or (4 if args.profile == "tiny" else 16)
    results = {}
    for name, params in variants(args, m).items():  # one model alive at a time
        model = build(args.profile, params, args.device, dtype, args.image_encoder, TrainParams())
        batch = synthetic_batch(model, batch_size=args.batch, generator=torch.Generator().manual_seed(0),
                                device=args.device, dtype=dtype)
        step = make_step(model, batch, dtype, args.device)
        for _ in range(args.warmup):
            step()
        handles = label_forwards(model)
        results[name] = profile_steps(step, args.steps, args.device)
        for handle in handles:
            handle.remove()
        del model, batch, step
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        print(f"# {name}: {results[name]['wall_ms']} ms/step", file=sys.stderr, flush=True)

    def top(ms: dict, n: int) -> list:
        return [[k, round(v, 2)] for k, v in sorted(ms.items(), key=lambda kv: -kv[1])[:n]]

    base, cc = results["baseline"]["self_ms"], results["cc"]["self_ms"]
    extra = {k: cc.get(k, 0.0) - base.get(k, 0.0) for k in set(base) | set(cc)}
    out = {"profile": args.profile, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "dtype": args.dtype, "batch": args.batch, "steps": args.steps, "torch": torch.__version__}
    for name, r in results.items():
        self_ms = r.pop("self_ms")
        out[name] = {**r, "top_ops": top(self_ms, args.top)}
    out["extra_ops"] = top(extra, args.top)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

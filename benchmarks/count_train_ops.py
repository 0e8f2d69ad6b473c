"""Count the aten ops of one training step, per part, for the baseline and the cc model.

A device-free companion of ``profile_train_step.py``: the same two models (``bench_train_step``
builders), one forward + backward + AdamW step each under a dispatch mode that logs every aten
op, the part whose forward it ran in (text encoder, image encoder, UNet, MFI encoder; "other"
holds the rest of the forward: the losses and the glue), or "backward" or "optimizer", and its
output bytes. Op counts and bytes do not
depend on the device, so a structural change (a copy, a batched product) shows here without a
GPU; times do not.

    python benchmarks/count_train_ops.py --profile tiny --batch 2
    python benchmarks/count_train_ops.py --profile tiny --batch 2 --dtype bf16   # the casts autocast adds
    python benchmarks/count_train_ops.py --profile sd15-random --batch 2 --top 40   # ~20 min, 14 GB

Prints one JSON object: per model, {part: {op: [count, MB]}}; and ``grown``: the (part, op)
pairs whose bytes grew most from the baseline to cc.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench_train_step import DTYPES, add_variant_arguments, build, make_step, variants  # noqa: E402
from cc_model.config import TrainParams  # noqa: E402
from cc_model.synthetic import synthetic_batch  # noqa: E402

PARTS = ("text_encoder", "image_encoder", "unet", "mfi")


class OpLog(TorchDispatchMode):
    """(part, op) -> [count, output bytes], the part set by forward hooks."""

    def __init__(self):
        super().__init__()
        self.part = "other"
        self.ops: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        entry = self.ops[self.part, func.overloadpacket.__name__]
        entry[0] += 1
        entry[1] += sum(t.numel() * t.element_size() for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor))
        return out


def count_step(model, batch, dtype: torch.dtype = torch.float32) -> dict[tuple[str, str], list[int]]:
    log = OpLog()
    handles = []
    for part in PARTS:
        module = getattr(model, part)
        handles.append(module.register_forward_pre_hook(lambda _m, _a, part=part: setattr(log, "part", part)))
        handles.append(module.register_forward_hook(lambda _m, _a, _o: setattr(log, "part", "other")))
    step = make_step(model, batch, dtype, "cpu", mark=lambda phase: setattr(log, "part", phase))
    with log:
        step()
    for handle in handles:
        handle.remove()
    return dict(log.ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=["tiny", "sd15-random"], default="tiny")
    parser.add_argument("--batch", type=int, default=2, help="at least 2 (CSCL contrasts the batch)")
    parser.add_argument("--top", type=int, default=25, help="(part, op) pairs listed in 'grown'")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="bf16: frozen weights in bf16 under CPU autocast, as the GPU step runs; shows the casts "
                             "(_to_copy), though CPU autocast's op lists are not quite CUDA's")
    add_variant_arguments(parser)
    args = parser.parse_args()
    torch.manual_seed(0)
    m = args.num_visual_tokens or (4 if args.profile == "tiny" else 16)
    counted = {}
    for name in ("baseline", "cc"):  # one model alive at a time
        model = build(args.profile, variants(args, m)[name], "cpu", DTYPES[args.dtype], args.image_encoder,
                      TrainParams())
        batch = synthetic_batch(model, batch_size=args.batch, generator=torch.Generator().manual_seed(0))
        counted[name] = count_step(model, batch, DTYPES[args.dtype])
        del model, batch
    out: dict = {"profile": args.profile, "batch": args.batch, "dtype": args.dtype, "torch": torch.__version__}
    for name, ops in counted.items():
        parts: dict = {}
        for (part, op), (count, size) in sorted(ops.items()):
            parts.setdefault(part, {})[op] = [count, round(size / 1e6, 2)]
        out[name] = parts
    base, cc = counted["baseline"], counted["cc"]
    grown = sorted(set(base) | set(cc), key=lambda k: -(cc.get(k, [0, 0])[1] - base.get(k, [0, 0])[1]))
    out["grown"] = [[part, op, base.get((part, op), [0, 0])[0], cc.get((part, op), [0, 0])[0],
                     round((cc.get((part, op), [0, 0])[1] - base.get((part, op), [0, 0])[1]) / 1e6, 2)]
                    for part, op in grown[: args.top]]
    print(json.dumps(out))


if __name__ == "__main__":
    main()

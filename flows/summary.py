"""`python -m flows.summary [params.yaml]`: the pipeline's accounting, readable in a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flows.config.params import Params, load_params


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary_lines(params: Params) -> list[str]:
    lines = []
    metrics = _load(Path(params.filter.out_dir) / "metrics.json")
    if metrics:
        lines.append(f"{'source':<12}{'discovered':>11}{'accepted':>10}{'rej. ingest':>13}{'rej. filter':>13}")
        for source, m in metrics.items():
            lines.append(f"{source:<12}{m['discovered']:>11}{m['accepted']:>10}{m['rejected_ingest']:>13}"
                         f"{m['rejected_filter']:>13}")
            for reason, count in m.get("reasons", {}).items():
                lines.append(f"{'':<14}{reason}: {count}")
    stages = {"segment": ("masks", "rejected"), "embed": ("count", "rejected"), "pairs": ("pairs_total",),
              "similarity": ("frames", "subjects", "near_duplicate_subject_pairs"),
              "export": ()}
    for stage, keys in stages.items():
        stats = _load(Path(getattr(params, stage).out_dir) / "stats.json")
        if stats:
            parts = [f"{k}={stats[k]}" for k in keys if k in stats]
            if stage == "export":
                parts = [f"{split}: {stats[split]['rows']} rows, {stats[split]['subjects']} subjects"
                         for split in ("train", "heldout") if split in stats]
            lines.append(f"{stage}: " + ", ".join(parts))
    return lines


def main(argv: list[str]) -> None:
    print("\n".join(summary_lines(load_params(argv[0] if argv else "params.yaml"))))


if __name__ == "__main__":
    main(sys.argv[1:])

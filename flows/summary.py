"""`python -m flows.summary [params.yaml]`: the pipeline's accounting, readable in a terminal.

A stage's line comes from its stats.json only if its output table is there too (a failed
run leaves the stats of an earlier one beside no output); stages that ``dvc status`` calls
changed, and every stage downstream of one, are marked out of date, so old numbers never pass
for current ones.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from flows.config.params import Params, load_params


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


OUTPUTS = {"filter": "frames.parquet", "segment": "masks.parquet", "embed": "embeddings.parquet",
           "pairs": "pairs.parquet", "similarity": "neighbours.parquet", "export": "backgrounds.parquet",
           "train": "checkpoint/cc_adapter.safetensors", "evaluate": "scores.parquet"}
STALE = "  [out of date: run dvc repro]"


def dvc_changed_stages(cwd: str | Path = ".") -> set[str] | None:
    """Stages ``dvc repro`` would run: those ``dvc status`` reports as changed, and every stage
    downstream of one (its inputs are about to change, though ``dvc status`` cannot see that yet).
    None where it cannot say (no dvc, not a DVC project)."""
    if shutil.which("dvc") is None:
        return None
    try:
        proc = subprocess.run(["dvc", "status", "--json"], cwd=cwd, capture_output=True, text=True, timeout=120)
        changed = {name.split(":")[-1] for name in json.loads(proc.stdout)} if proc.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    if not changed:
        return changed
    try:
        return changed | downstream_stages(changed, cwd)
    except Exception:  # noqa: BLE001 - DVC's API failing must not hide what dvc status said
        return changed


def downstream_stages(stages: set[str], cwd: str | Path = ".") -> set[str]:
    """The stages that depend, directly or through others, on any of ``stages`` (DVC's stage graph)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(cwd)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to the stage whose output it reads
        # .dvc-file stages (dvc add, dvc import) have no name: they are never a dvc.yaml stage's name
        return {later_name for stage in graph.nodes if getattr(stage, "name", None) in stages
                for later in nx.ancestors(graph, stage) if (later_name := getattr(later, "name", None))}


def summary_lines(params: Params, changed: set[str] | None = None) -> list[str]:
    """The accounting lines; ``changed``: stages known to be out of date (dvc_changed_stages)."""
    changed = changed or set()
    lines = []
    metrics = _load(Path(params.filter.out_dir) / "metrics.json")
    if metrics and not (Path(params.filter.out_dir) / OUTPUTS["filter"]).is_file():
        lines.append("filter: no output (not run yet, or its last run failed)")
        metrics = None
    if metrics:
        if "filter" in changed:
            lines.append("filter" + STALE)
        lines.append(f"{'source':<12}{'discovered':>11}{'accepted':>10}{'rej. ingest':>13}{'rej. filter':>13}")
        for source, m in metrics.items():
            lines.append(f"{source:<12}{m['discovered']:>11}{m['accepted']:>10}{m['rejected_ingest']:>13}"
                         f"{m['rejected_filter']:>13}")
            for reason, count in m.get("reasons", {}).items():
                lines.append(f"{'':<14}{reason}: {count}")
    stages = {"segment": ("masks", "rejected"), "embed": ("count", "rejected"), "pairs": ("pairs_total",),
              "similarity": ("frames", "subjects", "near_duplicate_subject_pairs"),
              "export": (), "train": ("steps", "samples"),
              "evaluate": ("images", "CT", "R-CI", "E-CI", "R-DI", "E-DI", "random_weights")}
    for stage, keys in stages.items():
        out_dir = Path(getattr(params, stage).out_dir)
        stats = _load(out_dir / "stats.json")
        if stats and not (out_dir / OUTPUTS[stage]).is_file():
            lines.append(f"{stage}: no output (not run yet, or its last run failed)")
        elif stats:
            parts = [f"{k}={stats[k]}" for k in keys if k in stats]
            if stage == "export":
                parts = [f"{split}: {stats[split]['rows']} rows, {stats[split]['subjects']} subjects"
                         for split in ("train", "heldout") if split in stats]
            if stage == "train":
                parts += [f"loss over the last steps: {name}={value}"
                          for name, value in stats.get("loss_last_steps", {}).items() if name == "total"]
            lines.append(f"{stage}: " + ", ".join(parts) + (STALE if stage in changed else ""))
    return lines


def main(argv: list[str]) -> None:
    print("\n".join(summary_lines(load_params(argv[0] if argv else "params.yaml"), dvc_changed_stages())))


if __name__ == "__main__":
    main(sys.argv[1:])

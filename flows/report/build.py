"""The data report: a markdown page, PNG grids and histogram tables under data/report/.

Everything is read by streaming the stage tables once; only the few frames shown in the
grids are decoded.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from flows.config.params import SourcesParams
from flows.pairs.augment import Recipe, apply_recipe
from flows.paths import image_file
from flows.report import figures
from flows.schemas import FRAMES, MASKS, NEIGHBOURS, PAIRS
from flows.tables import iter_batches, iter_rows

AREA_BINS = np.linspace(0.0, 1.0, 21)
ANGLE_BINS = np.arange(0.0, 181.0, 15.0)
SIMILARITY_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass(frozen=True)
class ReportInputs:
    frames: Path
    masks: Path
    pairs: Path
    neighbours: Path
    stats: dict[str, Path]  # stage name -> its stats/metrics JSON


def _histogram(path: Path, schema, column: str, bins: np.ndarray, where=None) -> np.ndarray:
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    columns = [column] + ([where[0]] if where else [])
    for batch in iter_batches(path, schema, columns=columns):
        values = batch.column(column).to_numpy(zero_copy_only=False)
        if where:
            values = values[np.asarray(batch.column(where[0]).to_pylist()) == where[1]]
        values = values[~np.isnan(values.astype(np.float64))]
        # into the end bins, not dropped: a float16 cosine can read 1.0003, past the last edge
        counts += np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)[0]
    return counts


def _pick(items: list, n: int) -> list:
    """``n`` items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _frame_lookup(inputs: ReportInputs, wanted: set[str]) -> dict[str, dict]:
    """frame_id -> {source, image_path, rle, size} for the few frames shown."""
    found: dict[str, dict] = {}
    for batch in iter_batches(inputs.frames, FRAMES, columns=["frame_id", "source", "image_path"]):
        for row in batch.to_pylist():
            if row["frame_id"] in wanted:
                found[row["frame_id"]] = row
    for row in iter_rows(inputs.masks, MASKS, columns=["frame_id", "rle_counts", "width", "height"]):
        if row["frame_id"] in found:
            found[row["frame_id"]].update(rle=row["rle_counts"], size=(row["width"], row["height"]))
    return found


def _load(info: dict, sources: SourcesParams) -> tuple[Image.Image, np.ndarray]:
    image = Image.open(image_file(sources, info["source"], info["image_path"])).convert("RGB")
    w, h = info["size"]
    mask = mask_utils.decode({"size": [h, w], "counts": info["rle"]}).astype(bool)
    return image, mask


def build_report(inputs: ReportInputs, sources: SourcesParams, out_dir: Path, *,
                 n_pairs: int = 8, n_subjects: int = 4, n_neighbours: int = 5) -> dict:
    """Write report.md, pairs.png, neighbours.png, histograms.png and hist_*.csv; return a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hists = {
        "subject area fraction": (AREA_BINS, _histogram(inputs.masks, MASKS, "area_frac", AREA_BINS)),
        "positive angle (deg)": (ANGLE_BINS, _histogram(inputs.pairs, PAIRS, "angle_deg", ANGLE_BINS)),
        "subject similarity r": (SIMILARITY_BINS, _histogram(inputs.neighbours, NEIGHBOURS, "r", SIMILARITY_BINS,
                                                            where=("level", "subject"))),
    }
    for name, (edges, counts) in hists.items():
        _write_csv(out_dir / f"hist_{name.split()[1]}.csv", edges, counts)
    figures.histograms(hists, out_dir / "histograms.png")

    pairs = [p for p in iter_rows(inputs.pairs, PAIRS, columns=[
        "frame_id", "kind", "positive_frame_id", "angle_deg", "r_ij", "aug_crop", "aug_scale", "aug_flip",
        "aug_background", "aug_seed"])]
    shown = _pick([p for p in pairs if p["kind"] == "multiview"], n_pairs // 2 or 1)
    shown += _pick([p for p in pairs if p["kind"] == "augmentation"], n_pairs - len(shown))
    neighbours = {}
    for row in iter_rows(inputs.neighbours, NEIGHBOURS):
        if row["level"] == "subject" and row["rank"] < n_neighbours:
            neighbours.setdefault(row["i"], []).append(row)
    subjects = _pick(sorted(neighbours), n_subjects)
    representative = _representatives(inputs.frames, set(subjects) | {r["j"] for s in subjects for r in neighbours[s]})
    wanted = {p["frame_id"] for p in shown} | {p["positive_frame_id"] for p in shown if p["positive_frame_id"]}
    wanted |= set(representative.values())
    lookup = _frame_lookup(inputs, wanted)

    figures.grid([_pair_row(p, lookup, sources) for p in shown], out_dir / "pairs.png")
    figures.grid([(f"{s} -> " + ", ".join(f"{r['r']:.2f}" for r in neighbours[s]),
                   [figures.overlay(*_load(lookup[representative[x]], sources))
                    for x in [s] + [r["j"] for r in neighbours[s]]]) for s in subjects],
                 out_dir / "neighbours.png")
    stats = {name: json.loads(path.read_text()) for name, path in inputs.stats.items() if path.is_file()}
    markdown = _markdown(stats, hists, shown, subjects)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    return {"markdown": markdown, "histograms": {k: v[1].tolist() for k, v in hists.items()}}


def _representatives(frames: Path, subjects: set[str]) -> dict[str, str]:
    """subject -> its first frame_id in table order."""
    first: dict[str, str] = {}
    for batch in iter_batches(frames, FRAMES, columns=["frame_id", "subject_id"]):
        for fid, subject in zip(batch.column("frame_id").to_pylist(), batch.column("subject_id").to_pylist()):
            if subject in subjects and subject not in first:
                first[subject] = fid
    return first


def _pair_row(pair: dict, lookup: dict, sources: SourcesParams) -> tuple[str, list[Image.Image]]:
    image, mask = _load(lookup[pair["frame_id"]], sources)
    if pair["kind"] == "multiview":
        positive = _load(lookup[pair["positive_frame_id"]], sources)
        caption = f"angle {pair['angle_deg'] or float('nan'):.0f} deg, r {pair['r_ij']:.3f}"
    else:
        recipe = Recipe(tuple(pair["aug_crop"]), pair["aug_scale"], pair["aug_flip"], pair["aug_background"],
                        pair["aug_seed"])
        back = Image.open(image_file(sources, "openimages", recipe.background)) if recipe.background else None
        positive = apply_recipe(image, mask, recipe, back)
        caption = f"augmentation: scale {recipe.scale:.2f}, flip {recipe.flip}, background {recipe.background or '-'}"
    return caption, [figures.overlay(image, mask), figures.overlay(*positive)]


def _write_csv(path: Path, edges: np.ndarray, counts: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["bin_start", "count"])
        for lo, count in zip(edges[:-1], counts):
            writer.writerow([f"{lo:g}", int(count)])


def _markdown(stats: dict, hists: dict, shown: list, subjects: list) -> str:
    lines = ["# Data report", ""]
    for name, content in stats.items():
        lines += [f"## {name}", "", "```json", json.dumps(content, indent=2, sort_keys=True), "```", ""]
    lines += ["## Positive pairs", "", f"{len(shown)} pairs, reference then positive, masks in red:", "",
              "![pairs](pairs.png)", "",
              "## Nearest subjects", "", f"{len(subjects)} subjects and their nearest neighbours (r above):", "",
              "![neighbours](neighbours.png)", "", "## Distributions", "", "![histograms](histograms.png)", ""]
    for name, (edges, counts) in hists.items():
        lines += [f"- {name}: {int(counts.sum())} values"]
    return "\n".join(lines) + "\n"


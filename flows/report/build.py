"""The data report: a markdown page, PNG grids and histogram tables under data/report/.

The stage tables are streamed a batch at a time and filtered in Arrow: the examples are
chosen from the few columns that decide them (pair kind, neighbour level/rank/subject), then
only the chosen rows are read in full; only the few frames shown in the grids are decoded.
Memory stays at a batch or a row group, whatever the table size.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from flows.config.params import SourcesParams
from flows.pairs.augment import Recipe, apply_recipe
from flows.paths import image_file
from flows.report import figures
from flows.schemas import FRAMES, MASKS, NEIGHBOURS, PAIRS
from flows.tables import ROW_GROUP_ROWS, open_table

AREA_BINS = np.linspace(0.0, 1.0, 21)
ANGLE_BINS = np.arange(0.0, 181.0, 15.0)
SIMILARITY_BINS = np.linspace(-1.0, 1.0, 41)
DISTINCT_SLACK = 1_000_000  # subject ids held beyond twice the distinct ones before deduplicating again


@dataclass(frozen=True)
class ReportInputs:
    frames: Path
    masks: Path
    pairs: Path
    neighbours: Path
    stats: dict[str, Path]  # stage name -> its stats/metrics JSON


Condition = tuple[str, str, object]  # (column, "=" | "<" | "in", value or values)


def _ruled_out(row_group: pq.RowGroupMetaData, where: list[Condition]) -> bool:
    """True where the row group's min/max statistics show that no row meets ``where``."""
    names = [row_group.column(k).path_in_schema for k in range(row_group.num_columns)]
    for column, op, value in where:
        stats = row_group.column(names.index(column)).statistics
        if stats is None or not stats.has_min_max:
            continue
        try:
            if op == "=" and not stats.min <= value <= stats.max:
                return True
            if op == "<" and not stats.min < value:
                return True
            if op == "in" and not any(stats.min <= v <= stats.max for v in value):
                return True
        except TypeError:  # statistics of another type than the value: no conclusion
            continue
    return False


def _mask(batch: pa.RecordBatch, where: list[Condition]) -> np.ndarray:
    keep = np.ones(batch.num_rows, dtype=bool)
    for column, op, value in where:
        values = batch.column(column)
        if op == "=":
            test = pc.equal(values, value)
        elif op == "<":
            test = pc.less(values, value)
        else:
            test = pc.is_in(values, value_set=pa.array(list(value), values.type))
        keep &= test.to_numpy(zero_copy_only=False)
    return keep


def _select(path: Path, schema: pa.Schema, columns: list[str],
            where: list[Condition] = ()) -> Iterator[pa.RecordBatch]:
    """``columns`` of the rows that meet every condition of ``where``, in table order, a batch at a time.

    Row groups that their statistics rule out are skipped; in the others the ``where``
    columns are read first, and the other columns only for row groups holding a wanted row.
    """
    file = open_table(path, schema)
    where = list(where)
    for group in range(file.num_row_groups):
        if where and _ruled_out(file.metadata.row_group(group), where):
            continue
        if not where:
            yield from file.iter_batches(batch_size=ROW_GROUP_ROWS, row_groups=[group], columns=columns)
            continue
        keep = [_mask(batch, where) for batch in file.iter_batches(
            batch_size=ROW_GROUP_ROWS, row_groups=[group], columns=sorted({c for c, _, _ in where}))]
        keep = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
        if not keep.any():
            continue
        start = 0
        for batch in file.iter_batches(batch_size=ROW_GROUP_ROWS, row_groups=[group], columns=columns):
            part = keep[start:start + batch.num_rows]
            start += batch.num_rows
            if part.any():
                yield batch.filter(pa.array(part))


def _histogram(path: Path, schema, column: str, bins: np.ndarray, where=None) -> np.ndarray:
    """Counts of ``column`` in ``bins``, NaN and null left out; ``where``: (column, value) rows only."""
    counts = np.zeros(len(bins) - 1, dtype=np.int64)
    for batch in _select(path, schema, [column], [(where[0], "=", where[1])] if where else []):
        values = batch.column(column).to_numpy(zero_copy_only=False)
        values = values[~np.isnan(values.astype(np.float64))]
        # into the end bins, not dropped: a float16 cosine can read 1.0003, past the last edge
        counts += np.histogram(np.clip(values, bins[0], bins[-1]), bins=bins)[0]
    return counts


def _pick(items: list, n: int) -> list:
    """``n`` items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _rows_at(path: Path, schema: pa.Schema, positions: list[int], columns: list[str]) -> dict[int, dict]:
    """Row number -> the row (``columns``) for a few row numbers, reading only their row groups."""
    file = open_table(path, schema)
    sizes = [file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    by_group: dict[int, list[int]] = {}
    for position in sorted(set(positions)):
        by_group.setdefault(int(np.searchsorted(starts, position, side="right")) - 1, []).append(position)
    rows = {}
    for group, wanted in by_group.items():
        table = file.read_row_group(group, columns=columns).take([p - int(starts[group]) for p in wanted])
        rows.update(zip(wanted, table.to_pylist()))
    return rows


def _frame_lookup(inputs: ReportInputs, wanted: set[str]) -> dict[str, dict]:
    """frame_id -> {source, image_path, rle, size} for the few frames shown."""
    found: dict[str, dict] = {}
    for batch in _select(inputs.frames, FRAMES, ["frame_id", "source", "image_path"], [("frame_id", "in", wanted)]):
        for row in batch.to_pylist():
            found[row["frame_id"]] = row
    for batch in _select(inputs.masks, MASKS, ["frame_id", "rle_counts", "width", "height"],
                         [("frame_id", "in", set(found))]):
        for row in batch.to_pylist():
            found[row["frame_id"]].update(rle=row["rle_counts"], size=(row["width"], row["height"]))
    return found


def _load(info: dict, sources: SourcesParams) -> tuple[Image.Image, np.ndarray]:
    image = Image.open(image_file(sources, info["source"], info["image_path"])).convert("RGB")
    w, h = info["size"]
    mask = mask_utils.decode({"size": [h, w], "counts": info["rle"]}).astype(bool)
    return image, mask


def build_report(inputs: ReportInputs, sources: SourcesParams, out_dir: Path, *, n_pairs: int = 8,
                 n_subjects: int = 4, n_neighbours: int = 5, fill: tuple[int, int, int] = (0, 0, 0)) -> dict:
    """Write report.md, pairs.png, neighbours.png, histograms.png and hist_*.csv; return a summary.

    ``fill``: the pad colour of augmentation positives, as the training loader draws them
    (embed.background_rgb)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hists = {
        "subject area fraction": (AREA_BINS, _histogram(inputs.masks, MASKS, "area_frac", AREA_BINS)),
        "positive angle (deg)": (ANGLE_BINS, _histogram(inputs.pairs, PAIRS, "angle_deg", ANGLE_BINS)),
        "subject similarity r (each subject's top-k neighbours)": (
            SIMILARITY_BINS, _histogram(inputs.neighbours, NEIGHBOURS, "r", SIMILARITY_BINS, where=("level", "subject"))),
    }
    for name, (edges, counts) in hists.items():
        _write_csv(out_dir / f"hist_{name.split()[1]}.csv", edges, counts)
    figures.histograms(hists, out_dir / "histograms.png")

    shown = _chosen_pairs(inputs.pairs, n_pairs)
    subjects, neighbours = _chosen_subjects(inputs.neighbours, n_subjects, n_neighbours)
    representative = _representatives(inputs.masks, set(subjects) | {r["j"] for s in subjects for r in neighbours[s]})
    wanted = {p["frame_id"] for p in shown} | {p["positive_frame_id"] for p in shown if p["positive_frame_id"]}
    wanted |= set(representative.values())
    lookup = _frame_lookup(inputs, wanted)

    figures.grid([_pair_row(p, lookup, sources, fill) for p in shown], out_dir / "pairs.png")
    figures.grid([(f"{s} -> " + ", ".join(f"{r['r']:.2f}" for r in neighbours[s]),
                   [figures.overlay(*_load(lookup[representative[x]], sources))
                    for x in [s] + [r["j"] for r in neighbours[s]]]) for s in subjects],
                 out_dir / "neighbours.png")
    stats = {name: json.loads(path.read_text()) for name, path in inputs.stats.items() if path.is_file()}
    markdown = _markdown(stats, hists, shown, subjects)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    return {"markdown": markdown, "histograms": {k: v[1].tolist() for k, v in hists.items()}}


PAIR_COLUMNS = ["frame_id", "kind", "positive_frame_id", "angle_deg", "r_ij", "aug_crop", "aug_scale", "aug_flip",
                "aug_background", "aug_seed"]


def _chosen_pairs(path: Path, n_pairs: int) -> list[dict]:
    """The pairs shown: n_pairs // 2 (at least 1) multiview pairs spread evenly over the table's
    multiview rows, then augmentation pairs for the rest, each in table order.

    Two passes over the ``kind`` column find the rows (their number per kind, then where the
    chosen ones are); only those rows are read in full.
    """
    kinds = ("multiview", "augmentation")
    counts = dict.fromkeys(kinds, 0)
    for batch in _select(path, PAIRS, ["kind"]):
        for kind in kinds:
            counts[kind] += int(np.count_nonzero(_mask(batch, [("kind", "=", kind)])))
    first = list(_pick(range(counts["multiview"]), n_pairs // 2 or 1))
    ranks = {"multiview": first, "augmentation": list(_pick(range(counts["augmentation"]), n_pairs - len(first)))}
    positions: dict[str, dict[int, int]] = {kind: {} for kind in kinds}  # kind -> rank among its rows -> row
    seen, offset = dict.fromkeys(kinds, 0), 0
    for batch in _select(path, PAIRS, ["kind"]):
        for kind in kinds:
            rows = np.flatnonzero(_mask(batch, [("kind", "=", kind)]))
            for rank in ranks[kind]:
                if seen[kind] <= rank < seen[kind] + len(rows):
                    positions[kind][rank] = offset + int(rows[rank - seen[kind]])
            seen[kind] += len(rows)
        offset += batch.num_rows
    order = [positions[kind][rank] for kind in kinds for rank in ranks[kind]]
    rows = _rows_at(path, PAIRS, order, PAIR_COLUMNS)
    return [rows[p] for p in order]


def _chosen_subjects(path: Path, n_subjects: int, n_neighbours: int) -> tuple[list[str], dict[str, list[dict]]]:
    """n_subjects subjects spread evenly over the sorted subject ids that have subject-level
    neighbours of rank < n_neighbours, and those neighbour rows (table order) of each.

    One pass collects the distinct subject ids (Arrow strings, sorted by bytes = the code point
    order of Python's sorted), a second reads the rows of the chosen few.
    """
    top = [("level", "=", "subject"), ("rank", "<", n_neighbours)]
    distinct: list[pa.Array] = []
    held = compacted = 0
    for batch in _select(path, NEIGHBOURS, ["i"], top):
        distinct.append(pc.unique(batch.column("i")))
        held += len(distinct[-1])
        if held > 2 * compacted + DISTINCT_SLACK:  # a subject's rows spread over batches: dedupe now and then
            distinct = [pc.unique(pa.concat_arrays(distinct))]
            held = compacted = len(distinct[0])
    ids = pc.unique(pa.concat_arrays(distinct)) if distinct else pa.array([], pa.string())
    order = pc.sort_indices(ids)
    subjects = ids.take(order.take(pa.array(list(_pick(range(len(ids)), n_subjects)), pa.int64()))).to_pylist()
    neighbours: dict[str, list[dict]] = {s: [] for s in subjects}
    for batch in _select(path, NEIGHBOURS, NEIGHBOURS.names, top + [("i", "in", set(subjects))]):
        for row in batch.to_pylist():
            neighbours[row["i"]].append(row)
    return subjects, neighbours


def _representatives(masks: Path, subjects: set[str]) -> dict[str, str]:
    """subject -> its first frame_id with a mask (a frame segment rejected has none to draw), in table order."""
    first: dict[str, str] = {}
    for batch in _select(masks, MASKS, ["frame_id", "subject_id"], [("subject_id", "in", subjects)]):
        for fid, subject in zip(batch.column("frame_id").to_pylist(), batch.column("subject_id").to_pylist()):
            if subject not in first:
                first[subject] = fid
    return first


def _pair_row(pair: dict, lookup: dict, sources: SourcesParams,
              fill: tuple[int, int, int]) -> tuple[str, list[Image.Image]]:
    image, mask = _load(lookup[pair["frame_id"]], sources)
    if pair["kind"] == "multiview":
        positive = _load(lookup[pair["positive_frame_id"]], sources)
        caption = f"angle {pair['angle_deg'] or float('nan'):.0f} deg, r {pair['r_ij']:.3f}"
    else:
        recipe = Recipe(tuple(pair["aug_crop"]), pair["aug_scale"], pair["aug_flip"], pair["aug_background"],
                        pair["aug_seed"])
        back = Image.open(image_file(sources, "openimages", recipe.background)) if recipe.background else None
        positive = apply_recipe(image, mask, recipe, back, fill=fill)
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


"""The faults of a real crawl, planted on purpose, and their ground truth (faults.json).

Each planted fault is one the pipeline must catch with its own reject reason; faults.json lists
every affected item as {"fault", "source", "path", "stage", "reason", "frame_id"} where ``path``
is relative to the source's root (the MaskPath as written for the CSV-row fault) and
``frame_id`` is the flows.ids id of the rejected frame or box (null for whole-image faults).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from flows import reasons

# fault -> (stage that must reject it, reason from flows/reasons.py)
FAULTS: dict[str, tuple[str, str]] = {
    "truncated_jpeg": ("ingest", reasons.UNREADABLE_IMAGE),
    "empty_file": ("ingest", reasons.EMPTY_FILE),
    "mask_path_outside_root": ("ingest", reasons.PATH_OUTSIDE_ROOT),
    "blurred_frame": ("filter", reasons.BLURRY),
    "tiny_subject": ("filter", reasons.SUBJECT_TOO_SMALL),
    "near_duplicate": ("filter", reasons.NEAR_DUPLICATE),
    "missing_mask": ("filter", reasons.MISSING_MASK),
    "fragmented_mask": ("filter", reasons.MASK_FRAGMENTED),
    "group_of": ("filter", reasons.GROUP_OF),
    "too_few_views": ("filter", reasons.TOO_FEW_VIEWS),
}
OUTSIDE_ROOT_MASK_PATH = "../../outside.png"  # the escaping MaskPath written in the CSV
BLUR_RADIUS = 6.0  # Gaussian blur of the whole frame, far below any sane sharpness threshold
FRAGMENT_CELL = 10  # the fragmented mask keeps FRAGMENT_CELL - FRAGMENT_GAP pixel squares
FRAGMENT_GAP = 3


@dataclass(frozen=True)
class FaultRecord:
    fault: str  # a FAULTS key
    source: str  # "mvimgnet" or "openimages"
    path: str  # relative to the source root (or the CSV MaskPath)
    stage: str  # "ingest" or "filter"
    reason: str  # flows.reasons constant
    frame_id: str | None  # flows.ids frame id of the rejected frame or box; None for a whole image


def record(fault: str, source: str, path: str, frame_id: str | None = None) -> FaultRecord:
    stage, reason = FAULTS[fault]
    return FaultRecord(fault=fault, source=source, path=path, stage=stage, reason=reason, frame_id=frame_id)


def write_faults_json(records: list[FaultRecord], path: Path) -> None:
    rows = sorted((asdict(r) for r in records), key=lambda r: (r["source"], r["path"], r["fault"], r["frame_id"] or ""))
    path.write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def truncate(path: Path) -> None:
    """Cut a written file to half its bytes (an interrupted download)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def blur(rgb: np.ndarray) -> np.ndarray:
    """A strong Gaussian blur of the whole frame (H, W, 3)."""
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(BLUR_RADIUS)))


def fragment(mask: np.ndarray) -> np.ndarray:
    """The subject cut into many small squares by a grid of gaps (largest component << 50%)."""
    rows, cols = np.indices(mask.shape)
    keep = (rows % FRAGMENT_CELL >= FRAGMENT_GAP) & (cols % FRAGMENT_CELL >= FRAGMENT_GAP)
    return mask & keep

"""Turning a frame and its mask into the model's input: the segmented subject, square, preprocessed.

Per frame: decode the image and the COCO RLE mask, crop to the mask's bbox, paint every pixel
outside the mask with the background colour, pad to a square with the same colour (so the
model's centre crop keeps the whole subject), then apply the model's own eval transform.
This runs in DataLoader workers so that decoding overlaps the model's forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import transforms

from flows import reasons

Image.MAX_IMAGE_PIXELS = 200_000_000  # as in ingest: real photos are large

# Columns of the joined frames x masks table that the dataset reads.
WORK_COLUMNS = ("image_file", "rle_counts", "mask_width", "mask_height", "bbox_x", "bbox_y", "bbox_w", "bbox_h")


class SubjectError(ValueError):
    """A frame whose subject cannot be cut out; ``reason`` is one of flows.reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Item(NamedTuple):
    """One dataset item; the DataLoader collates a batch of them field by field."""

    index: int  # row of the work table, so results can be matched back in order
    pixels: torch.Tensor  # (3, S, S) uint8 (see split_preprocess) or float model input; zeros on failure
    reason: str  # "" on success, else a flows.reasons value
    detail: str  # what went wrong, "" on success


class SplitPreprocess(NamedTuple):
    """The model's eval transform cut at its ToTensor: uint8 crosses processes, floats are made on the device."""

    host: Callable[[Image.Image], torch.Tensor]  # PIL -> (3, S, S) uint8: resize, centre crop, RGB
    device: Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) uint8 -> float: /255, then the model's Normalize


def split_preprocess(preprocess: Callable) -> SplitPreprocess:
    """Split an open_clip eval transform ``Compose([..., ToTensor, Normalize])`` at its ToTensor.

    Both halves are the model's own transform objects; ``device(host(x)[None])[0]`` is
    bit-identical to ``preprocess(x)`` (ToTensor is exactly ``uint8 -> float32 / 255``).
    Moving the float conversion to the device quarters what workers, shared memory, pinning
    and the host-to-device copy move per image. A transform of another shape stays whole
    on the host (``device`` is then the identity).
    """
    steps = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if cut is None or not all(isinstance(t, transforms.Normalize) for t in steps[cut + 1:]):
        return SplitPreprocess(host=preprocess, device=_identity)
    return SplitPreprocess(host=_HostPart(transforms.Compose(steps[:cut])),
                           device=_DevicePart(transforms.Compose(steps[cut + 1:])))


class _HostPart:
    def __init__(self, before_to_tensor: Callable):
        self.before_to_tensor = before_to_tensor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.array(self.before_to_tensor(image).convert("RGB"), dtype=np.uint8)  # (S, S, 3)
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()  # (3, S, S)


class _DevicePart:
    def __init__(self, normalize: Callable):
        self.normalize = normalize

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(pixels.to(torch.float32).div(255))  # as ToTensor, then Normalize


def _identity(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def decode_rle(counts: bytes, *, width: int, height: int) -> np.ndarray:
    """A masks.parquet RLE as a (height, width) bool array."""
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)


def pixel_box(bbox: Sequence[float], *, width: int, height: int) -> tuple[int, int, int, int]:
    """COCO bbox (x, y, w, h; float pixels) -> integer (x0, y0, x1, y1) covering it, clipped to the image."""
    x, y, w, h = bbox
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return x0, y0, x1, y1


def segment_subject(image: Image.Image, mask: np.ndarray, bbox: Sequence[float],
                    background: Sequence[int]) -> Image.Image:
    """The subject cut out of ``image``: bbox crop, background outside the mask, padded square.

    ``mask`` is (height, width) bool at image size; the crop is centred on the square canvas.
    """
    width, height = image.size
    if mask.shape != (height, width):
        raise SubjectError(reasons.BAD_ANNOTATION,
                           f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {width}x{height}")
    x0, y0, x1, y1 = pixel_box(bbox, width=width, height=height)
    if x1 <= x0 or y1 <= y0:
        raise SubjectError(reasons.UNREADABLE_MASK, f"empty mask bbox {tuple(bbox)}")
    inside = mask[y0:y1, x0:x1]  # (h, w)
    if not inside.any():
        raise SubjectError(reasons.UNREADABLE_MASK, "mask has no pixels inside its bbox")
    h, w = inside.shape
    side = max(h, w)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in background))
    # paste with a mask copies exactly the subject's pixels; everything else keeps the fill
    canvas.paste(image.crop((x0, y0, x1, y1)).convert("RGB"), ((side - w) // 2, (side - h) // 2),
                 mask=Image.fromarray(inside.astype(np.uint8) * 255))  # mode L
    return canvas


class SubjectCutter:
    """One work row -> its :class:`Item`: the per-frame work that both datasets below run.

    A frame that fails yields zeros and a reason instead of raising, so one bad file never
    stops the stage; the caller writes it to the rejects table.
    """

    def __init__(self, *, preprocess: Callable[[Image.Image], torch.Tensor], image_size: int,
                 background: Sequence[int]):
        """``preprocess``: the model's whole eval transform, or the ``host`` half of :func:`split_preprocess`."""
        self.preprocess = preprocess
        self.image_size = image_size
        self.background = tuple(int(v) for v in background)
        # A failed item's stand-in, shaped and typed like a good one so batches still collate.
        probe = preprocess(Image.new("RGB", (image_size, image_size), self.background))
        self._blank = torch.zeros_like(probe)

    def __call__(self, index: int, row: dict) -> Item:
        """``row``: the WORK_COLUMNS of one frame, as Python values."""
        try:
            return Item(index, self.subject_pixels(row), "", "")
        except SubjectError as exc:
            return Item(index, self._blank, exc.reason, exc.detail)

    def subject_pixels(self, row: dict) -> torch.Tensor:
        """(3, S, S) preprocessed subject of one work row; raises :class:`SubjectError`."""
        image = _open_image(Path(row["image_file"]))
        try:
            mask = decode_rle(row["rle_counts"], width=row["mask_width"], height=row["mask_height"])
        except (ValueError, TypeError) as exc:
            raise SubjectError(reasons.UNREADABLE_MASK, f"RLE does not decode: {exc}") from None
        bbox = (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
        subject = segment_subject(image, mask, bbox, self.background)
        return self.preprocess(subject)


class SubjectDataset(torch.utils.data.Dataset):
    """Segmented subjects of a work table, preprocessed for the model, in table order.

    The table stays an Arrow table: forked workers share its buffers instead of copying
    Python objects (whose reference counts would touch, and so copy, every page).
    """

    def __init__(self, work: pa.Table, *, preprocess: Callable[[Image.Image], torch.Tensor],
                 image_size: int, background: Sequence[int]):
        """``preprocess``: the model's whole eval transform, or the ``host`` half of :func:`split_preprocess`."""
        self.work = work.select(list(WORK_COLUMNS)).combine_chunks()
        self.cut = SubjectCutter(preprocess=preprocess, image_size=image_size, background=background)

    def __len__(self) -> int:
        return self.work.num_rows

    def __getitem__(self, index: int) -> Item:
        return self.cut(index, {name: self.work.column(name)[index].as_py() for name in WORK_COLUMNS})


class StreamedSubjects(torch.utils.data.Dataset):
    """Segmented subjects of work rows that arrive with the request: ``dataset[(index, row)]``.

    The dataset holds no table: the loader's batch sampler reads the rows and sends each
    batch to a worker (see :func:`make_stream_loader`), so one set of workers serves an input
    of any length with only the batches in flight in memory.
    """

    def __init__(self, cut: SubjectCutter):
        self.cut = cut

    def __getitem__(self, key: tuple[int, dict]) -> Item:
        return self.cut(*key)


def _open_image(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise SubjectError(reasons.MISSING_FILE, f"image {path} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise SubjectError(reasons.UNREADABLE_IMAGE, f"image does not decode: {exc}") from None
    return image


def make_loader(dataset: SubjectDataset, *, batch_size: int, num_workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches in dataset order; ``num_workers`` processes decode while the model runs."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, in_order=True)


def make_stream_loader(dataset: StreamedSubjects, batches: Iterable[list[tuple[int, dict]]], *,
                       num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches of ``batches`` (lists of (work row number, row)) in order, one loader for the whole stream.

    ``batches`` is the loader's batch sampler: the loader reads it lazily in this process,
    ``prefetch_factor * num_workers`` batches ahead of the model, so it can be a streaming read.
    """
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       pin_memory=pin_memory, in_order=True)

"""Turning a frame and its mask into the model's input: the segmented subject, square, preprocessed.

Per frame: decode the image and the COCO RLE mask, crop to the mask's bbox, paint every pixel
outside the mask with the background colour, pad to a square with the same colour (so the
model's centre crop keeps the whole subject), then apply the model's own eval transform.
This runs in DataLoader workers so that decoding overlaps the model's forward.

Host cost. Each worker must keep up with its share of the model (ViT-L/14 at 224 px does
~1,770 img/s on an H100; 14 workers leave ~7.9 ms per image), and real frames are large.
So, per frame (:meth:`SubjectCutter.cut_out`):

- a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's ``Image.draft``),
  the largest reduction whose bbox square is still at least the model's input side, so
  the transform still only ever shrinks it (:func:`draft_scale`). The bbox and the mask
  are carried to the reduced grid: the mask becomes the fraction of each k x k block that
  is subject (an alpha, so edges blend as a full-resolution resize would blend them).
  The model's input then differs from the whole decode's by ~1-3 levels of 255 on average
  (tests/embed/test_embed_preprocess_draft.py): the square lands within half a reduced pixel
  of where it was (<= ~0.5 px of the input), and DCT scaling is not bicubic antialiasing.
  Other formats (PNG), and subjects too small to reduce, are decoded whole, as before;
- only the bbox window of the RLE is decoded (:func:`rle_window`), not the whole mask.

``benchmarks/bench_embed_host.py --compare-with <old preprocess.py>``: ms/img in one process
(torch on one thread, as in a worker; open_clip's 224 px transform) on bench_embed's synthetic
JPEGs (quality 90 with per-pixel noise, so entropy decoding weighs more than in most photos and
DCT scaling saves less), 2 shared cores at load 1.5-2.6, before -> after this path:

- 512x384: 3.0-3.4 -> 3.2-3.4 (every subject < 448 px, so k = 1: the same decode);
- 1600x1200 (k = 2 for 13 of 16, 4 for 1): 20-26 -> 13-15; JPEG decode 11-12.5 -> 8-10,
  mask 2.3-2.5 -> 1.1-1.3, crop/paint/pad 2.7 -> 0.5, transform 6.5-7.6 -> 2.5-3.1;
- 4000x3000 (k = 4 or 8): 123 -> 40; JPEG decode 57 -> 37.
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
        image = self.before_to_tensor(image)
        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (S, S, 3) uint8
        # numpy's transposing copy: torch's permute().contiguous() of a uint8 HWC tensor is ~4x
        # slower on one thread, and far slower when its thread pool competes for busy cores
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (3, S, S)


class _DevicePart:
    def __init__(self, normalize: Callable):
        self.normalize = normalize

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalize(pixels.to(torch.float32).div(255))  # as ToTensor, then Normalize


def _identity(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


def decode_rle(counts: bytes, *, width: int, height: int) -> np.ndarray:
    """A masks.parquet RLE as a (height, width) bool array (the whole mask; the stage decodes only windows)."""
    return mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)


def rle_flips(counts: bytes | str, *, width: int, height: int) -> np.ndarray:
    """Where a COCO compressed RLE flips between 0 and 1: increasing flat column-major indices.

    The mask is 1 at flat index ``p`` (pixel ``(p % height, p // height)``) when an odd number
    of flips are ``<= p``. Parses the string as pycocotools' ``rleFrString`` does; raises
    ValueError unless the runs cover exactly ``width * height`` pixels.
    """
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    chars = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0 or chars.min() < 0 or chars.max() > 63:
        raise ValueError("not a COCO compressed RLE string")
    more = (chars & 0x20) != 0  # 5 bits per character, low digits first, 0x20: more digits follow
    if more[-1]:
        raise ValueError("RLE string ends inside a number")
    last = np.flatnonzero(~more)
    first = np.concatenate(([0], last[:-1] + 1))
    digits = last - first + 1
    if digits.max() > 12:
        raise ValueError("RLE number too long")
    place = np.arange(chars.size) - np.repeat(first, digits)
    values = np.add.reduceat((chars & 0x1F) << (5 * place), first)
    negative = (chars[last] & 0x10) != 0  # sign bit of the last digit
    values[negative] -= np.left_shift(1, 5 * digits[negative])
    # counts after the third are stored as differences to the count two before
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    if values.min() < 0:
        raise ValueError("negative RLE run")
    flips = np.cumsum(values)
    if flips[-1] != width * height:
        raise ValueError(f"RLE runs cover {flips[-1]} pixels, not {width}x{height}")
    return flips


def rle_window(flips: np.ndarray, *, height: int, box: tuple[int, int, int, int], on: int = 1) -> np.ndarray:
    """The mask inside ``box`` = (x0, y0, x1, y1): (y1 - y0, x1 - x0) uint8, ``on`` for mask pixels, else 0.

    ``flips`` from :func:`rle_flips`. Column-major like the RLE (Fortran order, as pycocotools
    decodes), so ``window.T`` is C-contiguous. Costs O(window + runs), not O(image).
    """
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    col, row = np.divmod(flips, height)
    # where the window's values may change: each column's top pixel and the flips below it
    changes = np.concatenate((np.arange(x0, x1) * height + y0,
                              flips[(col >= x0) & (col < x1) & (row > y0) & (row < y1)]))
    changes.sort()
    values = (np.searchsorted(flips, changes, side="right") & 1).astype(np.uint8) * np.uint8(on)
    col, row = np.divmod(changes, height)
    at = (col - x0) * h + (row - y0)  # flat index in the window, column-major
    return np.repeat(values, np.diff(at, append=w * h)).reshape(w, h).T


def pixel_box(bbox: Sequence[float], *, width: int, height: int) -> tuple[int, int, int, int]:
    """COCO bbox (x, y, w, h; float pixels) -> integer (x0, y0, x1, y1) covering it, clipped to the image."""
    x, y, w, h = bbox
    x0, y0 = max(0, math.floor(x)), max(0, math.floor(y))
    x1, y1 = min(width, math.ceil(x + w)), min(height, math.ceil(y + h))
    return x0, y0, x1, y1


DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg's DCT-domain scaling offers PIL's draft()


def draft_scale(box: tuple[int, int, int, int], *, min_side: int) -> int:
    """The largest k in 8, 4, 2, 1 such that the bbox's square side, divided by k, is still >= ``min_side``.

    The square is resized to the model's input side (``min_side``) afterwards; with this k
    that resize still only shrinks, so the reduced decode never makes the model upsample.
    """
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    return next((k for k in DRAFT_SCALES if side >= k * min_side), 1)


def segment_subject(image: Image.Image, mask: np.ndarray, bbox: Sequence[float],
                    background: Sequence[int]) -> Image.Image:
    """The subject cut out of ``image``: bbox crop, background outside the mask, padded square.

    ``mask`` is (height, width) bool at image size; the crop is centred on the square canvas.
    The reference, full-resolution form of :meth:`SubjectCutter.cut_out`.
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
    alpha = Image.fromarray(inside.astype(np.uint8) * 255)
    return paint_square(image, Placement((x0, y0, x1, y1), alpha, side, ((side - w) // 2, (side - h) // 2)), background)


class Decoded(NamedTuple):
    """An image decoded for :meth:`SubjectCutter.place`."""

    image: Image.Image  # loaded, at 1/scale of the file's size
    scale: int  # k: 1, or 2, 4, 8 for a JPEG decoded by DCT scaling (Image.draft)
    full_size: tuple[int, int]  # (width, height) of the file


class Placement(NamedTuple):
    """What :func:`paint_square` copies from a (decoded) image, and where to."""

    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) on the image
    alpha: Image.Image  # mode L, the box's size: 255 subject, 0 background, between: blend
    side: int  # of the square
    at: tuple[int, int]  # where the box's corner goes on the square (parts outside are clipped)


def paint_square(image: Image.Image, placement: Placement, background: Sequence[int]) -> Image.Image:
    """A square of ``background`` with the subject of ``image`` on it, as ``placement`` says."""
    crop = image.crop(placement.box)
    if crop.mode != "RGB":
        crop = crop.convert("RGB")
    canvas = Image.new("RGB", (placement.side, placement.side), tuple(int(v) for v in background))
    # paste with a mask copies exactly the subject's pixels (blends where 0 < alpha < 255);
    # everything else keeps the fill
    canvas.paste(crop, placement.at, mask=placement.alpha)
    return canvas


def _round_div(value: int, divisor: int) -> int:
    """``value / divisor`` rounded half up, in integers (also for negative values)."""
    return (2 * value + divisor) // (2 * divisor)


class SubjectCutter:
    """One work row -> its :class:`Item`: the per-frame work that both datasets below run.

    A frame that fails yields zeros and a reason instead of raising, so one bad file never
    stops the stage; the caller writes it to the rejects table.
    """

    def __init__(self, *, preprocess: Callable[[Image.Image], torch.Tensor], image_size: int,
                 background: Sequence[int], jpeg_draft: bool = True):
        """``preprocess``: the model's whole eval transform, or the ``host`` half of :func:`split_preprocess`.

        ``jpeg_draft``: decode JPEGs at a reduced scale where the subject allows (see
        :func:`draft_scale`); False decodes every image whole (a reference for tests).
        """
        self.preprocess = preprocess
        self.image_size = image_size
        self.background = tuple(int(v) for v in background)
        self.jpeg_draft = jpeg_draft
        # The last decoded image and its (path, requested scale): the boxes of one OpenImages
        # photo are consecutive rows, so each photo is decoded once, not once per box.
        self._last: tuple[tuple[str, int], Decoded] | None = None
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
        return self.preprocess(self.cut_out(row))

    def cut_out(self, row: dict) -> Image.Image:
        """The square subject of one work row, before the model's transform; raises :class:`SubjectError`.

        As :func:`segment_subject` on the whole image and mask, except that a JPEG whose
        subject is large enough is decoded at 1/k scale (the square is then about 1/k of the
        full-resolution one, still >= ``image_size``) and that the mask is decoded only
        inside the bbox. Three steps, so that benchmarks/bench_embed_host.py can time them.
        """
        decoded = self.decode(row)
        return paint_square(decoded.image, self.place(row, decoded), self.background)

    def decode(self, row: dict) -> Decoded:
        """The row's image, decoded at 1/k (k = 1 unless it is a JPEG whose subject allows more).

        The previous row's image is reused when this row names the same file and asks for the
        same scale (decoded images are never modified: paint_square crops a copy).
        """
        path = Path(row["image_file"])
        if self._last is not None and self._last[0][0] == str(path):
            decoded = self._last[1]
            if self._wanted_scale(row, decoded.full_size) == self._last[0][1]:
                return decoded
        try:
            with Image.open(path) as image:
                full_size, scale = image.size, 1
                if (wanted := self._wanted_scale(row, full_size)) > 1:
                    scale = _draft(image, wanted)
                image.load()
        except FileNotFoundError:
            raise SubjectError(reasons.MISSING_FILE, f"image {path} does not exist") from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise SubjectError(reasons.UNREADABLE_IMAGE, f"image does not decode: {exc}") from None
        decoded = Decoded(image, scale, full_size)
        self._last = (str(path), wanted), decoded
        return decoded

    def _wanted_scale(self, row: dict, size: tuple[int, int]) -> int:
        """The DCT reduction the row's subject allows on an image of ``size`` (1 without jpeg_draft)."""
        if not self.jpeg_draft:
            return 1
        box = pixel_box((row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]), width=size[0], height=size[1])
        return draft_scale(box, min_side=self.image_size)

    def place(self, row: dict, decoded: Decoded) -> Placement:
        """Where the subject is on the decoded image, its mask there, and the square it goes on."""
        bbox = (row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"])
        width, height = row["mask_width"], row["mask_height"]
        scale = decoded.scale
        try:
            flips = rle_flips(row["rle_counts"], width=width, height=height)
        except (ValueError, TypeError) as exc:
            raise SubjectError(reasons.UNREADABLE_MASK, f"RLE does not decode: {exc}") from None
        if (width, height) != decoded.full_size:
            raise SubjectError(reasons.BAD_ANNOTATION, "mask is {}x{}, image is {}x{}".format(
                width, height, *decoded.full_size))
        x0, y0, x1, y1 = pixel_box(bbox, width=width, height=height)
        if x1 <= x0 or y1 <= y0:
            raise SubjectError(reasons.UNREADABLE_MASK, f"empty mask bbox {tuple(bbox)}")
        # The box on the decoded grid (pixel i covers full-resolution pixels [i k, (i + 1) k)),
        # and the full-resolution pixels those blocks cover: the bbox plus < k on each side.
        box = (x0 // scale, y0 // scale, -(-x1 // scale), -(-y1 // scale))
        bx0, by0 = box[0] * scale, box[1] * scale
        bx1, by1 = min(box[2] * scale, width), min(box[3] * scale, height)
        alpha = rle_window(flips, height=height, box=(bx0, by0, bx1, by1), on=255)  # (h, w), Fortran order
        if scale > 1:  # the margin around the bbox is not subject, as in segment_subject
            alpha[:y0 - by0] = 0
            alpha[y1 - by0:] = 0
            alpha[:, :x0 - bx0] = 0
            alpha[:, x1 - bx0:] = 0
        if not alpha.any():
            raise SubjectError(reasons.UNREADABLE_MASK, "mask has no pixels inside its bbox")
        # mode L, made from the C-contiguous transpose and, where k > 1, reduced before it is
        # turned upright: the subject's share of each k x k block (an edge block may be partial)
        alpha = Image.fromarray(alpha.T)
        if scale > 1:
            alpha = alpha.reduce(scale)
        alpha = alpha.transpose(Image.Transpose.TRANSPOSE)
        # The square segment_subject makes: side max(w, h), from (left, top) in the full image.
        # At 1/k it is round(side / k) wide (>= image_size, by draft_scale), placed so that its
        # centre is the full square's centre to within half a reduced pixel (a sub-pixel shift
        # of what the model sees, at most ~0.5 px of its input); at k = 1 it is the same square.
        side = max(x1 - x0, y1 - y0)
        left, top = x0 - (side - (x1 - x0)) // 2, y0 - (side - (y1 - y0)) // 2
        reduced = _round_div(side, scale)
        left, top = (_round_div(2 * corner + side - reduced * scale, 2 * scale) for corner in (left, top))
        return Placement(box, alpha, reduced, (box[0] - left, box[1] - top))


def _draft(image: Image.Image, scale: int) -> int:
    """Ask ``image`` (opened, not loaded) to decode at 1/``scale``; the scale it will use (1: not a JPEG)."""
    width, height = image.size
    drafted = image.draft(image.mode, (width // scale, height // scale))
    if drafted is None:
        return 1
    _, (_, _, reduced_width, _) = drafted  # the original size / the scale libjpeg uses
    return round(width / reduced_width)


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
    piece of rows to a worker (see :func:`make_stream_loader`), so one set of workers serves an
    input of any length with only the pieces in flight in memory.
    """

    def __init__(self, cut: SubjectCutter):
        self.cut = cut

    def __getitem__(self, key: tuple[int, dict]) -> Item:
        return self.cut(*key)


def make_loader(dataset: SubjectDataset, *, batch_size: int, num_workers: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """Batches in dataset order; ``num_workers`` processes decode while the model runs."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=num_workers > 0, in_order=True)


def make_stream_loader(dataset: StreamedSubjects, pieces: Iterable[list[tuple[int, dict]]], *,
                       num_workers: int, pin_memory: bool, prefetch_pieces: int = 2) -> torch.utils.data.DataLoader:
    """Pieces of ``pieces`` (lists of (work row number, row)) in order, one loader for the whole stream.

    ``pieces`` is the loader's batch sampler: the loader reads it lazily in this process,
    ``prefetch_pieces`` per worker ahead of the model, so it can be a streaming read.
    """
    return torch.utils.data.DataLoader(dataset, batch_sampler=pieces, num_workers=num_workers,
                                       pin_memory=pin_memory, in_order=True,
                                       prefetch_factor=prefetch_pieces if num_workers > 0 else None)

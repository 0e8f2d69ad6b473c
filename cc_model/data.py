"""Training samples from the export stage's shards (``data/export``): what ``cc_model.train`` feeds the model.

One sample is one row of ``<export>/<split>/part-*.parquet``, a reference frame and its positive:

- ``target`` / ``mask``: the reference image as the diffusion target, the largest square that is
  centred on the subject as far as the image allows, resized to the UNet's pixel size; the subject
  mask over that square (the localisation loss).
- ``reference``: the *segmented* subject x^ (box crop, background painted ``background_rgb``,
  padded square; flows.embed.preprocess.segment_subject, the x^ whose embeddings give r_ij),
  resized to the image encoder's side, in [0, 1].
- ``positive``: a multi-view positive is the row whose ``frame_id`` is ``positive_frame_id``
  (same split), segmented the same way: another view of the subject. An augmentation positive is
  the reference replayed through :func:`flows.pairs.augment.apply_recipe` with the background photo
  from ``backgrounds.parquet`` (exactly the positive the pairs stage described), and the encoder
  sees that whole image, padded square (:func:`pad_square`). Cut to the subject's box and painted
  like the reference, it would lose the crop (the subject's position and size in the frame) and
  the new background, leaving a copy of the reference, flipped or not: no "other view, position,
  size" for MACL to contrast.
- ``input_ids``: the caption tokenized by the model's tokenizer; the shard's ``placeholder_index``
  must point at the placeholder in them.

:meth:`ExportDataset.collate` stacks samples and adds r_ij over the batch, the (2B, 2B) cosines of
the rows' appearance embeddings ``[references; positives]`` from ``embeddings.parquet``.

Rows are read one Parquet row group at a time (the export writes groups of 64 rows) through a
per-process cache. :class:`SubjectBatchSampler` forms the batches: never two samples of one
subject, nor of two near-duplicate subjects (CSCL and MACL take every other sample as a
negative), dealt from windows of row groups so that the cache, which holds more groups than a
window, reads each group about once per window per DataLoader worker.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from cc_model.splus import tokenize_captions
from flows.embed.preprocess import decode_rle, segment_subject
from flows.pairs.augment import Recipe, apply_recipe
from flows.schemas import BACKGROUNDS, EXPORT, HARD_NEGATIVES, NEAR_DUPLICATES
from flows.tables import TableReadError, fixed_size_list_to_numpy, open_table

INDEX_COLUMNS = ["sample_id", "subject_id", "frame_id", "positive_frame_id", "aug_crop", "aug_scale", "aug_flip", "aug_background",
                 "aug_seed", "caption", "placeholder_index", "embedding_id", "positive_embedding_id"]
PIXEL_COLUMNS = ["image_jpeg", "width", "height", "mask_rle"]


class ExportDataError(TableReadError):
    """Export shards that cannot feed training (empty split, dangling positive, missing embedding)."""


class RowGroups:
    """Random access to some columns of a list of Parquet files, one cached row group at a time.

    Files are opened lazily in each process (DataLoader workers get their own handles and cache).
    """

    def __init__(self, files: Sequence[Path], schema: pa.Schema, columns: list[str], *, cache_groups: int = 4):
        self.files, self.schema, self.columns, self.cache_groups = list(files), schema, columns, cache_groups
        self.groups: list[tuple[int, int]] = []  # (file, row group) in order
        starts = [0]
        for f, path in enumerate(self.files):
            metadata = open_table(path, schema).metadata
            for g in range(metadata.num_row_groups):
                self.groups.append((f, g))
                starts.append(starts[-1] + metadata.row_group(g).num_rows)
        self.starts = np.asarray(starts, dtype=np.int64)  # (groups + 1,) first row of each group
        self._handles: dict[int, Any] = {}
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def group_of(self, row: int) -> int:
        return int(np.searchsorted(self.starts, row, side="right")) - 1

    def row(self, row: int) -> dict[str, Any]:
        if not 0 <= row < len(self):
            raise IndexError(row)
        g = self.group_of(row)
        table = self._cache.get(g)
        if table is None:
            f, group = self.groups[g]
            if f not in self._handles:
                self._handles[f] = open_table(self.files[f], self.schema)
            table = self._handles[f].read_row_group(group, columns=self.columns)
            self._cache[g] = table
            if len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return table.slice(row - int(self.starts[g]), 1).to_pylist()[0]

    def __getstate__(self) -> dict:  # file handles and cached tables stay in their process
        state = dict(self.__dict__)
        state["_handles"], state["_cache"] = {}, OrderedDict()
        return state


def read_index(files: Sequence[Path]) -> pa.Table:
    """The non-pixel columns of every row of the split, in row order (Arrow: tens of bytes per row)."""
    parts = [open_table(path, EXPORT).read(columns=INDEX_COLUMNS) for path in files]
    return pa.concat_tables(parts).combine_chunks() if parts else EXPORT.empty_table().select(INDEX_COLUMNS)


def positions(values: pa.Array | pa.ChunkedArray, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each value, its first position in ``keys``; -1 where it is null or absent."""
    return pc.index_in(values, value_set=keys).fill_null(-1).to_numpy().astype(np.int64)


def unresolved(values: pa.ChunkedArray, rows: np.ndarray) -> pa.ChunkedArray:
    """The non-null ``values`` whose row (from :func:`positions`) was not found."""
    return pc.filter(values, pa.array((rows < 0) & values.is_valid().to_numpy(False)))


def read_embeddings(path: Path, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings of ``ids``: an (n, D) float16 matrix of the distinct rows wanted, and each id's row in it.

    The id column is read once and matched in one pass; the vectors stream into a preallocated
    matrix, so memory peaks at the result plus one batch.
    """
    file = open_table(path)
    keys = file.read(columns=["frame_id"])["frame_id"]
    table_rows = positions(ids, keys)  # each id's row in the embeddings table, -1 if absent
    if (table_rows < 0).any():
        missing = pc.filter(ids, pa.array(table_rows < 0)).unique().to_pylist()
        raise ExportDataError(f"{path}: no embedding for {len(missing)} of the shards' frames, e.g. {missing[0]}; "
                              f"the shards and the embeddings are from different runs (dvc repro export)")
    wanted = np.unique(table_rows)  # sorted table rows to keep
    dim = file.schema_arrow.field("embedding").type.list_size
    matrix = np.empty((len(wanted), dim), dtype=np.float16)
    start = 0
    for batch in file.iter_batches(columns=["embedding"], batch_size=65_536):
        lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
        if hi > lo:
            vectors = fixed_size_list_to_numpy(batch.column("embedding"))
            matrix[lo:hi] = vectors[wanted[lo:hi] - start]
        start += batch.num_rows
    return matrix, np.searchsorted(wanted, table_rows)


def subject_bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """COCO (x, y, w, h) of a bool mask's pixels."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty subject mask")
    return float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())


def target_view(image: Image.Image, mask: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray]:
    """The largest square of ``image`` centred on the subject as far as the borders allow, at ``size``."""
    width, height = image.size
    side = min(width, height)
    x, y, w, h = subject_bbox(mask)
    left = int(np.clip(round(x + w / 2 - side / 2), 0, width - side))
    top = int(np.clip(round(y + h / 2 - side / 2), 0, height - side))
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    square_mask = Image.fromarray(mask[top : top + side, left : left + side].astype(np.uint8) * 255)
    return square, np.asarray(square_mask.resize((size, size), Image.NEAREST)) > 127


def pad_square(image: Image.Image, background: Sequence[int]) -> Image.Image:
    """The whole image, centred on a square of ``background`` (an encoder's input is square, never squashed)."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in background))
    canvas.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ExportDataset(torch.utils.data.Dataset):
    """The samples of one split of the export stage's shards (see the module docstring)."""

    def __init__(self, export_dir: str | Path, split: str, *, embeddings: str | Path, tokenizer,
                 placeholder_id: int, pixel_size: int, image_size: int, background_rgb: Sequence[int],
                 cache_groups: int = 32):
        export_dir = Path(export_dir)
        files = sorted((export_dir / split).glob("part-*.parquet"))
        if not files:
            raise ExportDataError(f"{export_dir / split}: no shards (part-*.parquet); run the export stage first "
                                  f"(dvc repro export)")
        self.rows = RowGroups(files, EXPORT, PIXEL_COLUMNS, cache_groups=cache_groups)
        self.index = read_index(files)
        if not len(self.index):
            raise ExportDataError(f"{export_dir / split}: the split has no samples")
        # Row numbers as arrays, not per-row Python objects: a split may hold millions of rows.
        positive = self.index["positive_frame_id"]
        self.positive_rows = positions(positive, self.index["frame_id"])  # -1: augmentation positive
        dangling = unresolved(positive, self.positive_rows)
        if len(dangling):
            raise ExportDataError(f"{export_dir / split}: {len(dangling)} positives are not frames of the split, "
                                  f"e.g. {dangling[0].as_py()}; rerun the export stage")
        self.background_rows = np.full(len(self.index), -1, dtype=np.int64)
        self.backgrounds = None
        names = self.index["aug_background"]
        if names.null_count < len(names):
            path = export_dir / "backgrounds.parquet"
            self.backgrounds = RowGroups([path], BACKGROUNDS, ["image_jpeg"], cache_groups=cache_groups)
            self.background_rows = positions(names, open_table(path, BACKGROUNDS).read(columns=["image_path"])[0])
            missing = unresolved(names, self.background_rows)
            if len(missing):
                raise ExportDataError(f"{path}: no photo {missing[0].as_py()!r} that a recipe names; "
                                      f"rerun the export stage")
        ids = pa.chunked_array([*self.index["embedding_id"].chunks, *self.index["positive_embedding_id"].chunks],
                               pa.string())
        self.embeddings, rows = read_embeddings(Path(embeddings), ids)
        self.embedding_rows = rows.reshape(2, -1)  # (2, n): references, positives
        encoded = pc.dictionary_encode(self.index["subject_id"]).combine_chunks()
        self.subject_names = encoded.dictionary  # subject code -> subject_id
        self.subjects = encoded.indices.to_numpy().astype(np.int64)  # (n,) each row's subject code
        self.tokenizer, self.placeholder_id = tokenizer, placeholder_id
        self._check_captions(export_dir / split)
        self.pixel_size, self.image_size = pixel_size, image_size
        self.background_rgb = tuple(int(v) for v in background_rgb)

    def _check_captions(self, where: Path) -> None:
        """Each distinct caption, tokenised as the model does: within the text encoder's length, and
        its placeholder at the rows' placeholder_index. Export counts with open_clip's tokenizer, whose
        ftfy and HTML unescaping split some text differently (ligatures, full-width letters,
        entities); a mismatch fails here, not at the training step that first reaches the row."""
        distinct = pa.table({"caption": self.index["caption"], "index": self.index["placeholder_index"]})
        distinct = distinct.group_by(["caption", "index"]).aggregate([])
        limit = self.tokenizer.model_max_length
        for caption, index in zip(distinct["caption"].to_pylist(), distinct["index"].to_pylist()):
            ids = self.tokenizer(caption, truncation=False).input_ids
            if len(ids) > limit:
                raise ExportDataError(f"{where}: the caption {caption!r} is {len(ids)} tokens for the model's tokenizer, "
                                      f"over its {limit}; shorten export.caption_template or the class name")
            if not 0 <= index < len(ids) or ids[index] != self.placeholder_id:
                raise ExportDataError(f"{where}: placeholder_index {index} does not point at the placeholder in the "
                                      f"model's tokens of {caption!r}; rerun the export stage")

    def __len__(self) -> int:
        return len(self.index)

    def row_groups(self) -> list[range]:
        """The sample indices of each row group, in order (what SubjectBatchSampler deals from)."""
        starts = self.rows.starts
        return [range(int(starts[g]), int(starts[g + 1])) for g in range(len(starts) - 1)]

    def image_and_mask(self, row: int) -> tuple[Image.Image, np.ndarray]:
        pixels = self.rows.row(row)
        image = Image.open(io.BytesIO(pixels["image_jpeg"])).convert("RGB")
        mask = decode_rle(pixels["mask_rle"], width=pixels["width"], height=pixels["height"])
        return image, mask

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i``'s index columns (sample_id, caption, the recipe, ...)."""
        return {name: self.index[name][i].as_py() for name in INDEX_COLUMNS}

    def positive(self, i: int, image: Image.Image, mask: np.ndarray) -> tuple[Image.Image, np.ndarray]:
        if self.positive_rows[i] >= 0:
            return self.image_and_mask(int(self.positive_rows[i]))
        row = self.row(i)
        recipe = Recipe(crop=tuple(row["aug_crop"]), scale=row["aug_scale"], flip=row["aug_flip"],
                        background=row["aug_background"], seed=row["aug_seed"])
        background = None
        if recipe.background is not None:
            jpeg = self.backgrounds.row(int(self.background_rows[i]))["image_jpeg"]
            background = Image.open(io.BytesIO(jpeg))
        return apply_recipe(image, mask, recipe, background, fill=self.background_rgb)

    def subject(self, image: Image.Image, mask: np.ndarray) -> torch.Tensor:
        """x^: the segmented subject on a square, at the image encoder's side, (3, S, S) in [0, 1]."""
        return self.encoder_input(segment_subject(image, mask, subject_bbox(mask), self.background_rgb))

    def encoder_input(self, square: Image.Image) -> torch.Tensor:
        return to_tensor(square.resize((self.image_size, self.image_size), Image.BICUBIC))

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image, mask = self.image_and_mask(i)
            positive, positive_mask = self.positive(i, image, mask)
            target, target_mask = target_view(image, mask, self.pixel_size)
            reference_x = self.subject(image, mask)
            if self.positive_rows[i] >= 0:  # another view
                positive_x = self.subject(positive, positive_mask)
            else:  # the recipe's crop, scale, flip and background, all of them
                if not positive_mask.any():
                    raise ValueError("the augmentation positive has no subject pixel left")
                positive_x = self.encoder_input(pad_square(positive, self.background_rgb))
        except ValueError as exc:
            raise ExportDataError(f"sample {self.index['sample_id'][i].as_py()}: {exc}") from exc
        caption = self.index["caption"][i].as_py()
        input_ids = tokenize_captions(self.tokenizer, [caption])[0]  # checked against placeholder_index at init
        return {
            "target": to_tensor(target) * 2.0 - 1.0,  # (3, P, P) in [-1, 1], the VAE's range
            "mask": torch.from_numpy(target_mask.astype(np.float32))[None],  # (1, P, P)
            "reference": reference_x,  # (3, S, S) in [0, 1]
            "positive": positive_x,
            "input_ids": input_ids,
            "embedding_rows": (int(self.embedding_rows[0, i]), int(self.embedding_rows[1, i])),
        }

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Stack samples; ``appearance_sim``: (2B, 2B) cosines over [references; positives]."""
        batch = {name: torch.stack([item[name] for item in items])
                 for name in ("target", "mask", "reference", "positive", "input_ids")}
        rows = [item["embedding_rows"][0] for item in items] + [item["embedding_rows"][1] for item in items]
        z = torch.from_numpy(self.embeddings[rows].astype(np.float32))  # (2B, D)
        z = torch.nn.functional.normalize(z, dim=-1)
        batch["appearance_sim"] = z @ z.T
        return batch


def near_duplicate_conflicts(path: str | Path, subject_names: pa.Array) -> dict[int, set[int]]:
    """Subject code -> codes of the subjects the similarity stage flagged as its near-duplicates."""
    table = open_table(path, NEAR_DUPLICATES).read(columns=["subject_a", "subject_b"])
    a, b = positions(table["subject_a"], subject_names), positions(table["subject_b"], subject_names)
    conflicts: dict[int, set[int]] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        if x >= 0 and y >= 0:  # pairs with a subject of the other split cannot meet in a batch
            conflicts.setdefault(x, set()).add(y)
            conflicts.setdefault(y, set()).add(x)
    return conflicts


def hard_negative_lists(path: str | Path, subject_names: pa.Array) -> dict[int, list[int]]:
    """Subject code -> codes of its hard negatives (similarity stage), hardest first.

    Only pairs with both subjects in this split are kept: a negative must be a sample the batch
    can hold.
    """
    table = open_table(path, HARD_NEGATIVES).read(columns=["subject_id", "negative_subject_id", "rank"])
    subject = positions(table["subject_id"], subject_names)
    negative = positions(table["negative_subject_id"], subject_names)
    order = np.lexsort((table["rank"].to_numpy(), subject))  # by subject, hardest first
    lists: dict[int, list[int]] = {}
    for x, y in zip(subject[order].tolist(), negative[order].tolist()):
        if x >= 0 and y >= 0:
            lists.setdefault(x, []).append(y)
    return lists


class SubjectBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches in which every sample is of a different subject, and no two are near-duplicates.

    CSCL and MACL take every other sample of a batch as a negative, so another view of the same
    object, or a near-duplicate subject (similarity stage), must not be in it. Row groups come in
    random order, in windows of ``window_groups`` (locality for the row-group cache); within a
    window the subjects' rows are interleaved (shuffled subjects, shuffled rows) and dealt into
    batches; a row that conflicts with the batch being filled waits for the next one. Rows still
    waiting at the end of an epoch are left out of that epoch (like ``drop_last``; logged).

    Hard negatives: with ``hard_per_batch`` = n > 0, until a batch holds n of them, each row dealt
    into it brings along a row of its subject's hardest negative (``hard_negatives``, similarity
    stage) that still fits the batch and has a row unused in this epoch: one of the current
    window's rows if it has one, else from wherever it lies in the split (one more row-group
    read, like a multi-view positive); a row whose negatives are
    all blocked or used brings none. Every row is still used at most once per epoch; the stream
    skips rows already taken. ``hard_counts``: such rows in each of the epoch's batches.

    Deterministic in (seed, epoch); ``set_epoch(epoch, start)`` skips ``start`` batches (resume).
    """

    def __init__(self, groups: list[range], subjects: np.ndarray, *, batch_size: int, seed: int,
                 conflicts: dict[int, set[int]] | None = None, window_groups: int = 16,
                 hard_negatives: dict[int, list[int]] | None = None, hard_per_batch: int = 0):
        distinct = len(np.unique(subjects))
        if distinct < batch_size:
            raise ExportDataError(f"the train split has {distinct} subjects, fewer than train.batch_size "
                                  f"({batch_size}): a batch needs one sample of each of {batch_size} subjects")
        if not 0 <= hard_per_batch < batch_size:
            raise ValueError(f"hard_per_batch must be in [0, batch_size={batch_size}), got {hard_per_batch}")
        self.groups, self.subjects, self.conflicts = groups, subjects, conflicts or {}
        self.batch_size, self.seed, self.window_groups = batch_size, seed, window_groups
        self.hard_negatives, self.hard_per_batch = (hard_negatives or {}) if hard_per_batch else {}, hard_per_batch
        self.epoch, self.start = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None
        self._rows_of: dict[int, np.ndarray] | None = None
        self.left_out = 0  # rows of the current epoch in no batch
        self.hard_counts: list[int] = []  # per batch of the current epoch: its rows drawn as hard negatives

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _stream(self, rng: np.random.Generator, window: np.ndarray | None = None) -> Iterator[int]:
        """The rows in dealing order; ``window`` (bool per row), if given, marks the current window's rows."""
        order = rng.permutation(len(self.groups))
        previous = np.zeros(0, dtype=np.int64)
        for w in range(0, len(order), self.window_groups):
            rows = np.concatenate([np.asarray(self.groups[g], dtype=np.int64)
                                   for g in order[w : w + self.window_groups]])
            if window is not None:
                window[previous], window[rows] = False, True
                previous = rows
            rows = rows[rng.permutation(len(rows))]
            by_subject: dict[int, list[int]] = {}
            for row in rows.tolist():
                by_subject.setdefault(int(self.subjects[row]), []).append(row)
            lists = list(by_subject.values())  # subjects in order of first appearance: shuffled
            for depth in range(max(len(x) for x in lists)):  # round robin: one row of each subject per pass
                for rows_of_subject in lists:
                    if depth < len(rows_of_subject):
                        yield rows_of_subject[depth]

    def _subject_rows(self) -> dict[int, np.ndarray]:
        """Subject code -> its rows, for drawing hard negatives (built once)."""
        if self._rows_of is None:
            order = np.argsort(self.subjects, kind="stable")
            codes, starts = np.unique(self.subjects[order], return_index=True)
            self._rows_of = {int(c): rows for c, rows in zip(codes, np.split(order, starts[1:]))}
        return self._rows_of

    def batches(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        hard_rng = np.random.default_rng([self.seed, self.epoch, 1])  # the stream's draws stay as without
        rows_of = self._subject_rows() if self.hard_per_batch else {}
        unused: dict[int, list[int]] = {}  # per hard-negative subject: its rows in this epoch's order, to draw from
        used = np.zeros(len(self.subjects), dtype=bool)
        window = np.zeros(len(self.subjects), dtype=bool)  # the rows of the window being dealt
        out: list[list[int]] = []
        waiting: list[int] = []
        current: list[int] = []
        blocked: set[int] = set()
        hard = [0]  # rows drawn as hard negatives into the batch being filled
        counts: list[int] = []

        def fits(row: int) -> bool:
            subject = int(self.subjects[row])
            if subject in blocked:
                return False
            current.append(row)
            used[row] = True
            blocked.add(subject)
            blocked.update(self.conflicts.get(subject, ()))
            return True

        def draw(negative: int) -> int | None:
            """An unused row of this subject, one of the current window's if it has one (its row group is
            likely in the readers' cache), or None."""
            if negative not in unused:
                rows = rows_of.get(negative, np.zeros(0, np.int64))
                unused[negative] = rows[hard_rng.permutation(len(rows))].tolist()
            rows = unused[negative]
            while rows and used[rows[-1]]:
                rows.pop()
            for i in range(len(rows) - 1, -1, -1):
                if window[rows[i]] and not used[rows[i]]:
                    return rows.pop(i)
            return rows.pop() if rows else None

        def place(row: int) -> bool:
            if not fits(row):
                return False
            if hard[0] < self.hard_per_batch and len(current) < self.batch_size:
                for negative in self.hard_negatives.get(int(self.subjects[row]), ()):
                    if negative not in blocked and (drawn := draw(negative)) is not None:
                        fits(drawn)
                        hard[0] += 1
                        break
            return True

        for row in self._stream(rng, window):
            if used[row]:  # drawn earlier as a hard negative
                continue
            if not place(row):
                waiting.append(row)
            while len(current) == self.batch_size:  # a full batch: start the next with the waiting rows
                out.append(current[:])
                current.clear()
                blocked.clear()
                counts.append(hard[0])
                hard[0] = 0
                waiting = [r for r in waiting if not used[r] and not (len(current) < self.batch_size and place(r))]
        self.left_out = sum(len(g) for g in self.groups) - self.batch_size * len(out)
        self.hard_counts = counts
        self._cached = (self.epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.start :]

    def __len__(self) -> int:
        return len(self.batches()) - self.start


def pixel_size(model) -> int:
    """The side of the images the VAE encodes into the UNet's latent size."""
    return model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)


def dataset_for(model, export_dir: str | Path, split: str, *, embeddings: str | Path,
                background_rgb: Sequence[int], cache_groups: int = 32) -> ExportDataset:
    """An ExportDataset sized and tokenized for ``model`` (a CustomContrastModel)."""
    return ExportDataset(export_dir, split, embeddings=embeddings, tokenizer=model.tokenizer,
                         placeholder_id=model.text.placeholder_id, pixel_size=pixel_size(model),
                         image_size=model.image_encoder.config.image_size, background_rgb=background_rgb,
                         cache_groups=cache_groups)


__all__ = ["ExportDataError", "ExportDataset", "RowGroups", "SubjectBatchSampler", "dataset_for",
           "hard_negative_lists", "near_duplicate_conflicts", "pixel_size", "read_embeddings", "subject_bbox", "target_view", "to_tensor"]

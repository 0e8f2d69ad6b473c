"""The held-out split: which samples the model never trains on.

MVImgNet is split by object (all views of one object together). OpenImages is split by photo,
not by box: two boxes of one photo share its pixels, so they must share a split. Augmentation
backgrounds are drawn from photos of the same split. The rule is a seeded hash of each such
unit, so the pairs stage (which draws backgrounds) and the export stage (which writes the
splits) agree without passing any table between them.

Near-duplicates: two different subjects that the similarity stage flagged as near-duplicates
(the same product captured twice, one photo posted twice) would leak the held-out subject into
training. With ``export.group_near_duplicates`` the units joined by such pairs form groups
(connected components, :func:`near_duplicate_groups`), and a unit's split is the hash of its
group's key (the smallest unit key in it), so a whole group lands in one split. Both stages
build the same groups from the same two tables.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flows import ids
from flows.config.params import ExportParams
from flows.schemas import FRAMES, NEAR_DUPLICATES
from flows.tables import iter_batches, open_table

SPLITS = ("train", "heldout")


def unit_key(source: str, subject_id: str, image_path: str) -> str:
    """What is split as a whole: an MVImgNet object (its subject id), an OpenImages photo."""
    return photo_key(image_path) if source == ids.OPENIMAGES else subject_id


def photo_key(image_path: str) -> str:
    return f"{ids.OPENIMAGES}:{image_path}"


@dataclass(frozen=True)
class SplitRule:
    heldout_fraction: float
    seed: int
    groups: Mapping[str, str] = field(default_factory=dict, hash=False)  # unit key -> its near-duplicate group's key

    @classmethod
    def from_params(cls, params: ExportParams, groups: Mapping[str, str] | None = None) -> "SplitRule":
        return cls(heldout_fraction=params.heldout_fraction, seed=params.seed, groups=groups or {})

    def of_key(self, key: str) -> str:
        key = self.groups.get(key, key)
        digest = hashlib.blake2b(f"{self.seed}|{key}".encode(), digest_size=8).digest()
        return "heldout" if int.from_bytes(digest, "little") / 2**64 < self.heldout_fraction else "train"

    def of(self, source: str, subject_id: str, image_path: str) -> str:
        """The split of a frame: by object for MVImgNet, by photo for OpenImages (and by group)."""
        return self.of_key(unit_key(source, subject_id, image_path))

    def of_photo(self, image_path: str) -> str:
        """The split of an OpenImages photo (e.g. an augmentation background)."""
        return self.of_key(photo_key(image_path))


@dataclass(frozen=True)
class NearDuplicateGroups:
    """Units joined by near-duplicate subject pairs: ``groups`` maps each unit of a group of two or
    more to the group's key. ``unknown``: subjects of the pairs that no frame has (skipped)."""

    groups: dict[str, str]
    pairs: int
    unknown: int

    def summary(self, rule: SplitRule) -> dict:
        """Counts for a stage's stats: groups, units in them, the largest, units whose split the
        grouping changed (their own hash would have put them in the other split)."""
        sizes = Counter(self.groups.values())
        plain = SplitRule(heldout_fraction=rule.heldout_fraction, seed=rule.seed)
        moved = sum(plain.of_key(unit) != rule.of_key(unit) for unit in self.groups)
        return {"pairs": self.pairs, "groups": len(sizes), "units": len(self.groups),
                "largest": max(sizes.values(), default=0), "units_moved": moved, "unknown_subjects": self.unknown}


def split_rule(params) -> SplitRule:
    """The rule a pipeline run uses (``params``: flows.config.params.Params): grouped by the
    similarity stage's near-duplicates over the filter stage's frames when the export params say so."""
    return grouped_rule(params.export, Path(params.similarity.out_dir) / "near_duplicates.parquet",
                        Path(params.filter.out_dir) / "frames.parquet")[0]


def grouped_rule(params: ExportParams, near_duplicates: Path | None,
                 frames: Path) -> tuple[SplitRule, NearDuplicateGroups | None]:
    """The split rule of these export params, and its near-duplicate groups (None when
    ``params.group_near_duplicates`` is off): what pairs and export must both use."""
    if not params.group_near_duplicates:
        return SplitRule.from_params(params), None
    if near_duplicates is None:
        raise ValueError("export.group_near_duplicates needs the similarity stage's near_duplicates.parquet")
    grouped = near_duplicate_groups(near_duplicates, frames)
    return SplitRule.from_params(params, grouped.groups), grouped


def near_duplicate_groups(near_duplicates: Path, frames: Path) -> NearDuplicateGroups:
    """Group the split units that near-duplicate subject pairs join (union-find over unit keys).

    near_duplicates: the similarity stage's table; frames: the frames table, which gives each
    subject's unit (an OpenImages box is split with its photo). Memory: O(subjects in pairs).
    """
    table = open_table(near_duplicates, NEAR_DUPLICATES).read(columns=["subject_a", "subject_b"])
    wanted = pa.concat_arrays([table["subject_a"].combine_chunks(), table["subject_b"].combine_chunks()]).unique()
    unit_of: dict[str, str] = {}
    for batch in iter_batches(frames, FRAMES, columns=["source", "subject_id", "image_path"]):
        batch = batch.filter(pc.is_in(batch.column("subject_id"), value_set=wanted))
        for source, subject, path in zip(*(batch.column(c).to_pylist() for c in ("source", "subject_id", "image_path"))):
            unit_of.setdefault(subject, unit_key(source, subject, path))
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in zip(table["subject_a"].to_pylist(), table["subject_b"].to_pylist()):
        if a in unit_of and b in unit_of:
            ra, rb = root(unit_of[a]), root(unit_of[b])
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the root is the smallest key of its group
    groups = {unit: root(unit) for unit in parent}
    sizes = Counter(groups.values())
    groups = {unit: key for unit, key in groups.items() if sizes[key] > 1}
    unknown = sum(1 for s in wanted.to_pylist() if s not in unit_of)
    return NearDuplicateGroups(groups=groups, pairs=table.num_rows, unknown=unknown)

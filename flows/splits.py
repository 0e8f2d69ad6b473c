"""The held-out split: which samples the model never trains on.

MVImgNet is split by object (all views of one object together). OpenImages is split by photo,
not by box: two boxes of one photo share its pixels, so they must share a split. Augmentation
backgrounds are drawn from photos of the same split. The rule is a seeded hash, so the pairs
stage (which draws backgrounds) and the export stage (which writes the splits) agree without
passing any table between them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from flows import ids
from flows.config.params import ExportParams

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class SplitRule:
    heldout_fraction: float
    seed: int

    @classmethod
    def from_params(cls, params: ExportParams) -> "SplitRule":
        return cls(heldout_fraction=params.heldout_fraction, seed=params.seed)

    def of_key(self, key: str) -> str:
        digest = hashlib.blake2b(f"{self.seed}|{key}".encode(), digest_size=8).digest()
        return "heldout" if int.from_bytes(digest, "little") / 2**64 < self.heldout_fraction else "train"

    def of(self, source: str, subject_id: str, image_path: str) -> str:
        """The split of a frame: by object for MVImgNet, by photo for OpenImages."""
        return self.of_photo(image_path) if source == ids.OPENIMAGES else self.of_key(subject_id)

    def of_photo(self, image_path: str) -> str:
        """The split of an OpenImages photo (e.g. an augmentation background)."""
        return self.of_key(f"{ids.OPENIMAGES}:{image_path}")

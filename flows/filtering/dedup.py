"""Exact and near-duplicate detection across subjects, in compact memory.

Duplicates are decided per image (several OpenImages boxes share one image) against the
images accepted before it in table order. Two images of the same subject (frames of one
MVImgNet object) are never duplicates of each other: neighbouring video frames look alike
by design.

Near-duplicates are found with a multi-index hash of the 64-bit perceptual hashes (faiss
IndexBinaryMultiHash): the hash is cut into ``nhash`` disjoint bit groups of ``b`` bits, and
two hashes within max_hamming bits differ in at most max_hamming // nhash bits on one of
the groups (pigeonhole), so probing each group's buckets within that many flipped bits finds
every true neighbour (the range search then checks the whole distance). The layout is chosen
for millions of images (:func:`multihash_layout`): wide groups keep the buckets nearly empty,
so a lookup costs about the same at 10M images as at 10k. Per image the index keeps about
100 bytes (faiss's hash tables and the 8-byte code) plus 24 bytes here, no strings.
"""

from __future__ import annotations

import hashlib
import math
from array import array

import faiss
import numpy as np

from flows import reasons

EXPECTED_IMAGES = 10_000_000  # the scale the layout is tuned for (MVImgNet + OpenImages)
MAX_GROUP_BITS = 32


def multihash_layout(max_hamming: int, expected_images: int = EXPECTED_IMAGES) -> tuple[int, int, int]:
    """(nhash, b, nflip) for exact range search within ``max_hamming`` bits of 64-bit codes.

    Exact for any choice: distance <= max_hamming on the whole code implies a distance of at
    most nflip = max_hamming // nhash on one of the nhash groups. Chosen to minimise the
    expected work of one lookup: nhash * probes * (1 + candidates per bucket), with probes =
    sum_{i <= nflip} C(b, i) and expected_images / 2**b candidates per bucket. For the default
    max_hamming 4 this gives 3 groups of 21 bits probed within 1 bit (66 buckets, ~5 candidates
    each at 10M images) instead of 5 groups of 12 bits (5 buckets of ~2,400 candidates).
    """
    if max_hamming < 0:
        raise ValueError(f"max_hamming must be >= 0, got {max_hamming}")

    def cost(nhash: int) -> float:
        b = min(64 // nhash, MAX_GROUP_BITS)
        probes = sum(math.comb(b, i) for i in range(max_hamming // nhash + 1))
        return nhash * probes * (1 + expected_images / 2**b)

    nhash = min(range(1, 65), key=cost)
    return nhash, min(64 // nhash, MAX_GROUP_BITS), max_hamming // nhash


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class DuplicateIndex:
    def __init__(self, *, max_hamming: int):
        self.max_hamming = max_hamming
        nhash, bits, nflip = multihash_layout(max_hamming)
        self._index = faiss.IndexBinaryMultiHash(64, nhash, bits)
        self._index.nflip = nflip
        self._content = array("Q")  # first 8 bytes of each indexed image's sha256
        self._subject = array("Q")  # hash of each indexed image's subject id
        self._row = array("q")  # the caller's row number of each indexed image (-1: none given)
        self._last_image: str | None = None
        self._last_verdict: tuple[str, str] | None = None
        self.matched_row: int | None = None  # the row of the image the last verdict points to

    def __len__(self) -> int:
        return len(self._content)

    def check_and_add(self, *, image_path: str, subject_id: str, content_hash: str, phash: int, row: int = -1):
        """(reason, detail) if this image duplicates an earlier one of another subject, else None.

        Consecutive calls with the same image_path (boxes of one image) share one verdict.
        ``row`` is kept for an image that is indexed; after a verdict, :attr:`matched_row` is
        the row given with the earlier image (8 bytes per image here, rather than its path).
        """
        if image_path == self._last_image:
            return self._last_verdict
        self.matched_row = None
        content = int(content_hash[:16], 16)
        subject = hash64(subject_id)
        code = np.array([phash], dtype=np.uint64).view(np.uint8).reshape(1, 8)
        verdict = None
        if len(self):
            lims, dist, found = self._index.range_search(code, self.max_hamming + 1)
            others = [(d, j) for d, j in sorted(zip(dist[lims[0]:lims[1]].tolist(), found[lims[0]:lims[1]].tolist()))
                      if self._subject[j] != subject and d <= self.max_hamming]
            exact = [j for _d, j in others if self._content[j] == content]
            if exact:
                verdict = (reasons.DUPLICATE,
                           f"same bytes as an earlier image (content_hash {self._content[exact[0]]:016x}...)")
                self.matched_row = self._row[exact[0]]
            elif others:
                d, j = others[0]
                verdict = (reasons.NEAR_DUPLICATE,
                           f"phash distance {int(d)} <= filter.near_duplicate_hamming {self.max_hamming} "
                           f"to an earlier image (content_hash {self._content[j]:016x}...)")
                self.matched_row = self._row[j]
            if self.matched_row is not None and self.matched_row < 0:
                self.matched_row = None
        if verdict is None:
            self._index.add(code)
            self._content.append(content)
            self._subject.append(subject)
            self._row.append(row)
        self._last_image, self._last_verdict = image_path, verdict
        return verdict

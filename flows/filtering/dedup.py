"""Exact and near-duplicate detection across subjects, in compact memory.

Duplicates are decided per image (several OpenImages boxes share one image) against the
images accepted before it in table order. Two images of the same subject (frames of one
MVImgNet object) are never duplicates of each other: neighbouring video frames look alike
by design.

Near-duplicates are found with a multi-index hash of the 64-bit perceptual hashes (faiss
IndexBinaryMultiHash): split into max_hamming+1 disjoint bit groups, any two hashes within
max_hamming bits agree exactly on at least one group (pigeonhole), so a lookup touches only
true candidates. Per image the index keeps 8 bytes of hash plus 16 bytes here, no strings.
"""

from __future__ import annotations

import hashlib
from array import array

import faiss
import numpy as np

from flows import reasons


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class DuplicateIndex:
    def __init__(self, *, max_hamming: int):
        self.max_hamming = max_hamming
        groups = max_hamming + 1
        self._index = faiss.IndexBinaryMultiHash(64, groups, min(64 // groups, 24))
        self._content = array("Q")  # first 8 bytes of each indexed image's sha256
        self._subject = array("Q")  # hash of each indexed image's subject id
        self._last_image: str | None = None
        self._last_verdict: tuple[str, str] | None = None

    def __len__(self) -> int:
        return len(self._content)

    def check_and_add(self, *, image_path: str, subject_id: str, content_hash: str, phash: int):
        """(reason, detail) if this image duplicates an earlier one of another subject, else None.

        Consecutive calls with the same image_path (boxes of one image) share one verdict.
        """
        if image_path == self._last_image:
            return self._last_verdict
        content = int(content_hash[:16], 16)
        subject = _hash64(subject_id)
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
            elif others:
                d, j = others[0]
                verdict = (reasons.NEAR_DUPLICATE,
                           f"phash distance {int(d)} <= filter.near_duplicate_hamming {self.max_hamming} "
                           f"to an earlier image (content_hash {self._content[j]:016x}...)")
        if verdict is None:
            self._index.add(code)
            self._content.append(content)
            self._subject.append(subject)
        self._last_image, self._last_verdict = image_path, verdict
        return verdict

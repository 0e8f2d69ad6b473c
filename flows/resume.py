"""A stage's work folder that outlives a failed run: finished pieces are not done twice.

Long stages (segment with SAM: GPU-hours at MVImgNet scale) write their work in pieces
(shards), each piece atomically. The folder carries a key: a digest of the stage's input
tables, its parameters and the project's code. A rerun with the same key keeps the pieces
marked done and does only the rest; any other key wipes the folder first, so work made
from other inputs, parameters or code is never mixed in. Image files under the source roots
are named by the key only through the roots' paths (hashing the images would cost what the
stage costs); the tables the stage reads name them by content hash.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from flows.tables import write_json_atomic

PROJECT = Path(__file__).resolve().parent  # the flows package: its code is part of every key
KEY_FILE = "key.json"


def work_key(*, inputs: list[Path], params: dict[str, Any]) -> str:
    """Digest of the input files' bytes, the parameters (dataclasses allowed) and the flows code."""
    digest = hashlib.sha256()
    for path in inputs:
        with open(path, "rb") as handle:
            digest.update(f"{Path(path).name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}\n".encode())
    plain = {name: asdict(value) if is_dataclass(value) else value for name, value in params.items()}
    digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    for source in sorted(PROJECT.rglob("*.py")):
        digest.update(f"{source.relative_to(PROJECT)}\n".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


class ResumableWork:
    """``open()`` it, ask ``done(name)`` per piece, ``mark_done(name, record)`` after writing one."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def open(self) -> int:
        """Make the folder ready; returns how many pieces an earlier run of this key finished."""
        try:
            kept = json.loads((self.folder / KEY_FILE).read_text())["key"] == self.key
        except (OSError, ValueError, KeyError, TypeError):
            kept = False
        if not kept:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            write_json_atomic(self.folder / KEY_FILE, {"key": self.key})
            return 0
        return len(list(self.folder.glob("*.done.json")))

    def done(self, name: str) -> dict[str, Any] | None:
        """The record of a finished piece, or None."""
        path = self.folder / f"{name}.done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, name: str, record: dict[str, Any]) -> None:
        """Call after the piece's outputs are written (atomically): from now on it counts as done."""
        write_json_atomic(self.folder / f"{name}.done.json", record)

    def finish(self) -> None:
        """The stage's outputs are complete: the work folder goes."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["ResumableWork", "work_key"]

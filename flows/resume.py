"""A stage's work folder that outlives a failed run: finished pieces are not done twice.

Long stages (segment with SAM: GPU-hours at MVImgNet scale) write their work in pieces
(shards, parts), each piece atomically. The folder carries a key: a digest of what decides
the pieces' bytes: the stage's input tables, the parameters that change its output, the
device and numeric mode, the library versions, the model files, and the stage's own code
(``code``: its package and the shared modules it writes through). A rerun with the same key
keeps the pieces marked done and does only the rest; any other key wipes the folder first,
so work made from other inputs, settings or code is never mixed in. Image files under the
source roots are named by the key only through the roots' paths (hashing the images would
cost what the stage costs); the tables the stage reads name them by content hash.

A piece is done when its record is written, after its files are on disk (fsynced); the
record lists each file with its row count, and :meth:`ResumableWork.done` trusts a piece
only while every listed file still opens with that many rows (a power cut, a hand-deleted
file): otherwise the piece is done again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from flows.tables import TableReadError, count_rows, write_json_atomic

FLOWS = Path(__file__).resolve().parent
SHARED_CODE = ("ids.py", "paths.py", "reasons.py", "accounting.py", "schemas.py", "tables.py", "resume.py")
KEY_FILE = "key.json"


def file_identity(path: str | Path) -> str:
    """A model file named by path, size and modification time (hashing gigabytes of weights is slow)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: absent"
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def device_identity(device) -> str:
    """The device type as keys hold it; on CUDA with the CUDA and cuDNN versions torch runs with.

    Kernels, and with them the low bits of bf16 results, change with those libraries; the GPU
    model is left out, so a run resumed on another card of the same software goes on.
    """
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind != "cuda":
        return kind
    import torch  # only stages that already hold a torch device get here

    return f"cuda (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})"


def library_versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def work_key(*, inputs: list[Path], params: dict[str, Any], code: Iterable[str]) -> str:
    """Digest of the input files' bytes, ``params`` (dataclasses allowed) and the named code under flows/.

    ``code``: paths relative to the flows package (a folder means its .py files); SHARED_CODE is
    always added.
    """
    digest = hashlib.sha256()
    for path in inputs:
        if not Path(path).is_file():  # the stage's own reader would say the same, a step later
            raise TableReadError(f"{path}: no such file; run the stage that writes it first "
                                 f"(dvc repro, or dvc repro <stage>)")
        with open(path, "rb") as handle:
            digest.update(f"{Path(path).name}:{hashlib.file_digest(handle, 'sha256').hexdigest()}\n".encode())
    plain = {name: asdict(value) if is_dataclass(value) else value for name, value in params.items()}
    digest.update(json.dumps(plain, sort_keys=True, default=str).encode())
    sources: set[Path] = set()
    for name in (*code, *SHARED_CODE):
        path = FLOWS / name
        sources |= set(path.rglob("*.py")) if path.is_dir() else {path}
    for source in sorted(sources):
        digest.update(f"{source.relative_to(FLOWS)}\n".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResumableWork:
    """``open()`` it, ask ``done(name)`` per piece, ``mark_done(name, record, files)`` after writing one."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def open(self) -> int:
        """Make the folder ready; returns how many pieces an earlier run of this key marked done."""
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
        """The record of a finished piece whose files are all intact, or None (not done, or to redo)."""
        path = self.folder / f"{name}.done.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        try:
            intact = all(count_rows(self.folder / file) == rows for file, rows in entry["files"].items())
        except (TableReadError, OSError, KeyError, TypeError, AttributeError):
            intact = False
        if not intact:
            path.unlink(missing_ok=True)
            return None
        return entry["record"]

    def done_prefix(self, stem: str, limit: int | None = None) -> list[dict[str, Any]]:
        """Records of the intact pieces ``<stem>-00000``, ``<stem>-00001``, ... up to the first missing one
        (at most ``limit``): for pieces written in order, what a rerun can skip."""
        records: list[dict[str, Any]] = []
        while (limit is None or len(records) < limit) and (
                record := self.done(f"{stem}-{len(records):05d}")) is not None:
            records.append(record)
        return records

    def mark_done(self, name: str, record: dict[str, Any], files: Iterable[Path]) -> None:
        """Call after the piece's Parquet ``files`` (under this folder) are written: they reach the disk, then the record."""
        rows = {}
        folders = {self.folder}
        for file in files:
            _fsync(file)
            rows[str(Path(file).relative_to(self.folder))] = count_rows(file)
            folders.add(Path(file).parent)
        for folder in folders:
            _fsync(folder)
        write_json_atomic(self.folder / f"{name}.done.json", {"record": record, "files": rows})

    def finish(self) -> None:
        """The stage's outputs are complete: the work folder goes."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["ResumableWork", "file_identity", "library_versions", "work_key"]

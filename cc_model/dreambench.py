"""DreamBench as published: ``dataset/<subject>/<NN>.jpg`` and ``prompts_and_classes.txt``.

The prompts file has a ``subject_name,class`` table under "Classes", then two Python-style
lists, "Object Prompts" and "Live Subject Prompts", of lines like
``'a {0} {1} in the jungle'.format(unique_token, class_token),``. Live subjects (the animals)
take the second list.

Each prompt gets one of the categories the paper reports: ``scene`` (recontextualisation),
``accessorisation`` (wearing / outfits), ``style`` (a colour or material adjective before the
subject) and ``shape`` ("cube shaped").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from flows.errors import UserFacingError

PROMPTS_FILE = "prompts_and_classes.txt"
_TEMPLATE = re.compile(r"""^\s*['"](.*)['"]\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$""")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DreamBenchError(UserFacingError, ValueError):
    """A DreamBench folder that is missing or not in the published layout."""


@dataclass(frozen=True)
class Subject:
    name: str  # folder name under dataset/
    class_name: str  # the class word of the prompts
    images: tuple[Path, ...]  # its reference photos, sorted
    live: bool  # takes the live-subject prompts


@dataclass(frozen=True)
class Prompt:
    template: str  # with {0} (the unique token) and {1} (the class word)
    category: str  # scene | accessorisation | style | shape

    def text(self, unique: str, class_name: str) -> str:
        """The prompt with ``unique`` as the subject's word (``""`` for CLIP-T), spaces normalised."""
        return " ".join(self.template.format(unique, class_name).split())


def category_of(template: str) -> str:
    if "shaped" in template:
        return "shape"
    if "wearing" in template or "outfit" in template:
        return "accessorisation"
    if not template.strip().startswith("a {0}"):  # an adjective before the subject: "a red {0} {1}"
        return "style"
    return "scene"


@dataclass(frozen=True)
class DreamBench:
    subjects: tuple[Subject, ...]
    object_prompts: tuple[Prompt, ...]
    live_prompts: tuple[Prompt, ...]

    def prompts_for(self, subject: Subject) -> tuple[Prompt, ...]:
        return self.live_prompts if subject.live else self.object_prompts


def _prompt_lists(text: str, path: Path) -> tuple[list[str], list[str]]:
    if "Live Subject Prompts" not in text or "Object Prompts" not in text:
        raise DreamBenchError(f"{path}: no 'Object Prompts' / 'Live Subject Prompts' sections")
    objects, live = text.split("Object Prompts", 1)[1].split("Live Subject Prompts", 1)
    lists = []
    for part in (objects, live):
        templates = [m.group(1) for line in part.splitlines() if (m := _TEMPLATE.match(line))]
        if not templates:
            raise DreamBenchError(f"{path}: a prompt list without any '...'.format(unique_token, class_token) line")
        lists.append(templates)
    return lists[0], lists[1]


def _classes(text: str, path: Path) -> dict[str, str]:
    lines = text.split("Prompts", 1)[0].splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().replace(" ", "") == "subject_name,class")
    except StopIteration:
        raise DreamBenchError(f"{path}: no 'subject_name,class' table") from None
    classes = {}
    for line in lines[start + 1:]:
        if not line.strip():
            if classes:
                break
            continue
        name, _, class_name = line.partition(",")
        classes[name.strip()] = class_name.strip()
    return classes


def read_dreambench(root: str | Path, *, live_classes: list[str]) -> DreamBench:
    """The subjects (those with a folder of images) and both prompt lists of a DreamBench root."""
    root = Path(root)
    path = root / PROMPTS_FILE
    if not path.is_file():
        raise DreamBenchError(f"{path}: no such file; sources.dreambench_root must hold {PROMPTS_FILE} and "
                              f"dataset/<subject>/")
    text = path.read_text(encoding="utf-8")
    classes = _classes(text, path)
    objects, live = _prompt_lists(text, path)
    subjects = []
    for name, class_name in sorted(classes.items()):
        folder = root / "dataset" / name
        images = tuple(sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        if not images:
            raise DreamBenchError(f"{folder}: subject {name!r} of {path.name} has no images")
        subjects.append(Subject(name, class_name, images, class_name in live_classes))
    return DreamBench(tuple(subjects), tuple(Prompt(t, category_of(t)) for t in objects),
                      tuple(Prompt(t, category_of(t)) for t in live))


__all__ = ["DreamBench", "DreamBenchError", "Prompt", "Subject", "category_of", "read_dreambench"]

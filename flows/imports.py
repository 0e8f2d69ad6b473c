"""The project's source files a module runs: its imports, read statically, transitively.

Every ``import`` and ``from ... import`` of the module (also inside functions) that names a
module of this project (flows, cc_model), then theirs, and so on; parent packages count, as
Python runs them. Used where the code that decides an output must be named: the dvc.yaml deps
test (tests/test_dvc_stage_deps.py) and the training state's resume key (cc_model.training),
so that editing evaluation code, which training never runs, does not restart a training run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("flows", "cc_model")


def module_file(name: str) -> Path | None:
    """The file of a project module or package named ``a.b.c``, or None."""
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_names(path: Path, package: str) -> set[str]:
    """Every module name the file imports, relative imports resolved against ``package``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # "from pkg import module"
    return names


def project_files(module: str) -> set[str]:
    """Files (relative to the project root) of the project modules ``module`` imports,
    transitively, itself included; empty ``__init__.py`` files are left out."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in PROJECT or (path := module_file(name)) is None:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run too
        todo += imported_names(path, name if path.name == "__init__.py" else ".".join(parts[:-1]))
    files = {module_file(name).relative_to(ROOT).as_posix() for name in seen}
    return {f for f in files if not (f.endswith("__init__.py") and not (ROOT / f).read_text(encoding="utf-8").strip())}


__all__ = ["PROJECT", "ROOT", "imported_names", "module_file", "project_files"]

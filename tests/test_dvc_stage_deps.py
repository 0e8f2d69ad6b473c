"""Every stage's code dependencies in dvc.yaml cover the modules its command imports.

A module the stage imports but dvc.yaml does not list would let ``dvc repro`` call stale
outputs "up to date" after that module changed. The imports are read statically (every
``import``/``from`` in the module and, transitively, in the project modules it imports,
including imports inside functions).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("flows", "cc_model")
# Imported by every stage but unable to change what a stage writes:
EXEMPT = {
    "flows/runtime.py": "Prefect settings (home, analytics)",
    "flows/cli.py": "argument handling; params are validated, then the flow runs",
    "flows/progress.py": "progress log lines only",
    "flows/errors.py": "the base class that marks user-facing errors",
    "flows/config/params.py": "parameter parsing: the values are tracked key by key under params:",
    "flows/config/typed.py": "the typed loader behind params.py",
    "cc_model/config.py": "the model/train sections of the same params",
    "cc_model/__init__.py": "docstring only",
}


def module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_names(path: Path, package: str) -> set[str]:
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
    """Files of the project modules ``module`` imports, transitively, itself included."""
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
    return {f for f in files if not (f.endswith("__init__.py") and f not in EXEMPT
                                     and not (ROOT / f).read_text(encoding="utf-8").strip())}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    spec = STAGES[stage]
    module = spec["cmd"].split("-m", 1)[1].split()[0]
    code = project_files(module) | project_files(f"{module}.__main__")
    deps = [d.rstrip("/") for d in spec.get("deps", []) if "${" not in d]
    missing = sorted(f for f in code - set(EXEMPT) if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them under deps"


def test_the_walk_sees_imports_inside_functions():
    # flows/embed/flow.py imports torch-heavy modules lazily; the walk must still find them
    assert "flows/embed/stage.py" in project_files("flows.embed.flow")

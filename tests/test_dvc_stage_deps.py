"""Every stage's code dependencies in dvc.yaml cover the modules its command imports.

A module the stage imports but dvc.yaml does not list would let ``dvc repro`` call stale
outputs "up to date" after that module changed. The imports are read statically (every
``import``/``from`` in the module and, transitively, in the project modules it imports,
including imports inside functions).
"""

from __future__ import annotations

import pytest
import yaml

from flows.imports import ROOT, project_files

# Imported by every stage but unable to change what a stage writes:
EXEMPT = {
    "flows/runtime.py": "Prefect settings (home, analytics)",
    "flows/cli.py": "argument handling; params are validated, then the flow runs",
    "flows/progress.py": "progress log lines only",
    "flows/errors.py": "the base class that marks user-facing errors",
    "flows/imports.py": "which source files a resume key hashes",
    "flows/config/params.py": "parameter parsing: the values are tracked key by key under params:",
    "flows/config/typed.py": "the typed loader behind params.py",
    "cc_model/__init__.py": "docstring only",
}

# Read by every stage's params loader, but only cc_model's stages use what it computes: the
# defaults params.yaml leaves to code (image_layers: [], heads: null, ...) must rerun those.
EXEMPT_OUTSIDE_CC_MODEL = {
    "cc_model/config.py": "the model/train sections: parsed for every stage, used by train and evaluate",
}


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(stage):
    spec = STAGES[stage]
    module = spec["cmd"].split("-m", 1)[1].split()[0]
    code = project_files(module) | project_files(f"{module}.__main__")
    deps = [d.rstrip("/") for d in spec.get("deps", []) if "${" not in d]
    exempt = set(EXEMPT) | (set() if module.startswith("cc_model.") else set(EXEMPT_OUTSIDE_CC_MODEL))
    missing = sorted(f for f in code - exempt if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them under deps"


def test_the_walk_sees_imports_inside_functions():
    # flows/embed/flow.py imports torch-heavy modules lazily; the walk must still find them
    assert "flows/embed/stage.py" in project_files("flows.embed.flow")

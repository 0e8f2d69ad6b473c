"""Every stage's flow module sets the project's Prefect environment before Prefect is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWS = sorted((ROOT / "flows").glob("*/flow.py")) + [ROOT / "flows" / "pipeline.py", ROOT / "flows" / "deploy.py",
                                                      ROOT / "cc_model" / "train.py"]


@pytest.mark.parametrize("path", FLOWS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_configure_runs_before_prefect_is_imported(path):
    body = ast.parse(path.read_text(encoding="utf-8")).body
    configured = None
    for index, node in enumerate(body):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "configure":
            configured = index
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name.split(".")[0] == "prefect" for name in names):
            assert configured is not None, f"{path} imports prefect before flows.runtime.configure()"
            return
    pytest.fail(f"{path} never imports prefect")

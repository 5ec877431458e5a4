"""Import layering (docs/architecture.md): a package imports only packages below it, parsed with ``ast``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. A package may import the packages of lower ranks; loadtest (benchmarks) may import anything.
RANK = {"core": 0, "models": 1, "weights": 2, "training": 3, "inference": 3, "export": 4, "medplatform": 5,
        "service": 6}
# Same-rank imports allowed: training's evaluation runs the generation pipelines the service serves.
PEER_IMPORTS = {("training", "inference")}
SERVER_FRAMEWORKS = {"bentoml", "fastapi", "starlette", "grpc"}
# inference/ modules that still import torch when imported: their pre/post-processing reuses models' torch
# functions (ROI, prompts, gate; DDIM). Any other inference module importing torch at import time fails, and
# so does an entry here once its module no longer does (the list only shrinks).
TORCH_AT_IMPORT = {"inference/pipeline.py", "inference/generation.py", "inference/generator_artifacts.py"}


def _imports(node: ast.AST, *, module_level_only: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import under ``node``; with ``module_level_only``, those that
    run on import (not inside a function, not under ``if TYPE_CHECKING``)."""
    for child in ast.iter_child_nodes(node):
        if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if module_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (item for stmt in child.orelse for item in _imports_of(stmt, module_level_only))
            continue
        yield from _imports_of(child, module_level_only)


def _imports_of(node: ast.AST, module_level_only: bool) -> Iterator[tuple[int, str]]:
    if isinstance(node, ast.Import):
        yield from ((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        yield node.lineno, node.module
    yield from _imports(node, module_level_only=module_level_only)


def _modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


def layer_violations(root: Path = REPO_ROOT) -> list[str]:
    """Every import, at any depth, of a package above the importing one (or a same-rank one not allowed)."""
    problems = []
    for package, rank in RANK.items():
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for line, module in _imports(tree, module_level_only=False):
                target = module.split(".")[0]
                if target == package or target not in RANK:
                    continue
                if RANK[target] > rank or (RANK[target] == rank and (package, target) not in PEER_IMPORTS):
                    problems.append(f"{path.relative_to(root)}:{line}: {package} imports {module}")
    return problems


def inference_import_problems(root: Path = REPO_ROOT) -> list[str]:
    """inference/ modules importing a server framework, or torch outside TORCH_AT_IMPORT, when imported."""
    problems = []
    for path in sorted((root / "inference").rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(), filename=str(path))
        tops = {(line, module.split(".")[0]) for line, module in _imports(tree, module_level_only=True)}
        for line, top in sorted(tops):
            if top in SERVER_FRAMEWORKS or (top == "torch" and relative not in TORCH_AT_IMPORT):
                problems.append(f"{relative}:{line}: imports {top} at module level")
        if relative in TORCH_AT_IMPORT and "torch" not in {top for _, top in tops}:
            problems.append(f"{relative}: no longer imports torch at module level; drop it from TORCH_AT_IMPORT")
    return problems


def test_every_package_imports_only_lower_layers():
    assert layer_violations() == []


def test_inference_imports_no_server_framework_and_torch_only_where_listed():
    assert inference_import_problems() == []


@pytest.mark.parametrize("package", sorted(RANK))
def test_every_layer_is_a_package_with_modules(package):
    assert (REPO_ROOT / package / "__init__.py").is_file() and len(_modules(package)) > 1


def test_a_violation_is_reported(tmp_path):
    for package in RANK:
        (tmp_path / package).mkdir()
    (tmp_path / "core" / "bad.py").write_text("def f():\n    from service.app import MedRefine\n")
    (tmp_path / "inference" / "bad.py").write_text(
        "import numpy\nfrom starlette.requests import Request\n\ndef f():\n    import torch\n")
    assert layer_violations(tmp_path) == ["core/bad.py:2: core imports service.app"]
    assert inference_import_problems(tmp_path) == ["inference/bad.py:2: imports starlette at module level"]

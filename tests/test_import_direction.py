"""The layout stays as designed: imports point downstream and never close a circle.

Every import counts, also those inside functions. The rules are ARCHITECTURE.md's:
package layers, train importing evaluate only to validate, writing and loading kept apart
inside data_engine, and the decode backends imported by the loader alone.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Which project packages each package may import (besides itself).
ALLOWED = {
    "common": set(),
    "synthetic": {"common"},
    "data_engine": {"common", "synthetic"},
    "model": {"common"},
    "evaluate": {"common", "synthetic", "data_engine", "model"},
    "train": {"common", "data_engine", "model", "evaluate"},
}
# Package edges that only some modules may use: train validates with evaluate's protocol,
# and needs nothing else of it (weights loading and export live in model).
ONLY_FROM = {("train", "evaluate"): {"train.validate"}}
BACKENDS = {"data_engine.loading.torch_backend", "data_engine.loading.dali_backend"}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (any scope)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, and every circle, as one line each."""
    graph = import_graph(root)
    found = []
    for source, targets in sorted(graph.items()):
        package = source.split(".")[0]
        for target in sorted(targets):
            target_package = target.split(".")[0]
            if target_package != package and target_package not in ALLOWED[package]:
                found.append(f"{source} imports {target}: {package} may not import "
                             f"{target_package}")
            only = ONLY_FROM.get((package, target_package))
            if only is not None and source not in only:
                found.append(f"{source} imports {target}: only {', '.join(sorted(only))} "
                             f"of {package} imports {target_package}")
            for side, other in (("writing", "loading"), ("loading", "writing")):
                if (source.startswith(f"data_engine.{side}")
                        and target.startswith(f"data_engine.{other}")):
                    found.append(f"{source} imports {target}: {side} and {other} stay apart")
            if target in BACKENDS and source != "data_engine.loading.loader":
                found.append(f"{source} imports {target}: only the loader imports backends")
    found += [f"circle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected part of the graph that has more than one module."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_project_imports_point_downstream() -> None:
    assert violations(ROOT) == []


def _copy_packages(tmp_path: Path) -> Path:
    for package in ALLOWED:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_an_upstream_import_inside_a_function_fails(tmp_path: Path) -> None:
    root = _copy_packages(tmp_path)
    margins = root / "model" / "margins.py"
    late_import = "\n\ndef _late():\n    from train.loop import Trainer\n"
    margins.write_text(margins.read_text() + late_import)
    found = violations(root)
    assert found[0] == "model.margins imports train.loop: model may not import train"
    assert any("model.margins -> train.loop" in line for line in found[1:])  # a circle too


def test_a_circle_and_a_backend_import_fail(tmp_path: Path) -> None:
    root = _copy_packages(tmp_path)
    batch = root / "data_engine" / "loading" / "batch.py"
    batch.write_text(batch.read_text() + "\nfrom data_engine.loading import torch_backend\n")
    found = violations(root)
    assert ("data_engine.loading.batch imports data_engine.loading.torch_backend: only the "
            "loader imports backends") in found
    assert any(line.startswith("circle: data_engine.loading.batch -> "
                               "data_engine.loading.torch_backend") for line in found), found


def test_train_imports_evaluate_only_to_validate(tmp_path: Path) -> None:
    root = _copy_packages(tmp_path)
    loop = root / "train" / "loop.py"
    loop.write_text(loop.read_text() + "\nfrom evaluate.features import load_embedder\n")
    assert violations(root) == ["train.loop imports evaluate.features: only train.validate of "
                                "train imports evaluate"]

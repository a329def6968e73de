"""dvc.yaml declares every module a stage runs, so editing one makes `dvc status` call the stage stale.

The modules are derived from the code, not listed by hand: every ``import charrnn...`` /
``from charrnn... import ...`` in the stage script (function-level imports included), followed
transitively through the ``charrnn`` package, plus ``charrnn/__init__.py``, which every import of
the package runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = REPO / "src" / "charrnn"
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def imported_modules(path: Path) -> set[str]:
    """Names of the charrnn modules ``path`` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from charrnn import model` imports charrnn.model; `from charrnn.x import y` imports x.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "charrnn" and len(parts) > 1 and (PACKAGE / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found


def stage_modules(script: Path) -> set[str]:
    """The repository files a stage script runs: itself and its charrnn modules, transitively."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imported_modules(PACKAGE / f"{name}.py") - seen)
    files = {script.relative_to(REPO).as_posix(), "src/charrnn/__init__.py"}
    return files | {f"src/charrnn/{name}.py" for name in seen}


def declared_code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.endswith(".py")}


@pytest.mark.parametrize("name", sorted(DVC_YAML["stages"]))
def test_each_stage_depends_on_exactly_the_modules_it_runs(name):
    stage = DVC_YAML["stages"][name]
    script = REPO / stage["cmd"].split()[1]
    assert script.parent.name == "stages", stage["cmd"]
    needed, declared = stage_modules(script), declared_code_deps(stage)
    assert not needed - declared, f"dvc.yaml stage '{name}' misses code deps: {sorted(needed - declared)}"
    assert not declared - needed, f"dvc.yaml stage '{name}' depends on modules it never runs: {sorted(declared - needed)}"


def test_the_import_scan_follows_function_level_and_transitive_imports(tmp_path):
    """The scan itself: evaluate imports Generator inside a function, and model imports files."""
    evaluate = stage_modules(REPO / "stages" / "evaluate.py")
    assert {"src/charrnn/evaluate.py", "src/charrnn/generate.py", "src/charrnn/files.py"} <= evaluate
    script = tmp_path / "s.py"
    script.write_text("def main():\n    from charrnn.sampling import SamplingOptions\n")
    assert imported_modules(script) == {"sampling"}


@pytest.mark.slow
def test_editing_the_presets_or_a_train_module_leaves_the_data_stages_up_to_date(trained_project, tmp_path):
    """Every import is a rerun edge: the presets (the CLI's) rerun nothing, a module only train runs
    reruns train alone, and the stage contract reruns every stage that reads it."""
    import json

    from conftest import copy_project, dvc

    project = copy_project(trained_project, tmp_path / "project")

    def stale_after_editing(relative: str) -> set[str]:
        path = project / relative
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            return set(json.loads(dvc(project, "status", "--json").stdout))
        finally:
            path.write_text(original)

    assert stale_after_editing("src/charrnn/cli.py") == set()
    assert stale_after_editing("src/charrnn/train.py") == {"train"}
    assert stale_after_editing("src/charrnn/batches.py") == {"train", "evaluate"}
    assert stale_after_editing("src/charrnn/artifacts.py") == {"vectorize", "sequences", "train", "evaluate"}

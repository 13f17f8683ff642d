"""The library knows nothing of its orchestrator: `mpo/` never imports Prefect, `flows/` or `tasks/`."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTER_RING = ("prefect", "flows", "tasks")


def test_mpo_imports_neither_prefect_nor_flows_nor_tasks() -> None:
    offenders = []
    for path in (ROOT / "mpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in OUTER_RING]
    assert offenders == []


def _imported_by_name(node: ast.AST) -> str | None:
    """``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``: the module named."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        return node.args[0].value
    return None


def test_mpo_does_not_reach_the_orchestrator_by_name_either() -> None:
    """Runners outside the library are found through the ``mpo.runners`` entry points only
    (``mpo.pipeline.find_runner``), not by importing ``flows`` or ``tasks`` by a string."""
    offenders = []
    for path in (ROOT / "mpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            module = _imported_by_name(node)
            if module and module.split(".")[0] in OUTER_RING:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {module}")
    assert offenders == []


def test_the_check_sees_an_import_by_name() -> None:
    tree = ast.parse('import importlib\nimportlib.import_module("flows.data_engine")\n__import__("tasks")')
    assert [m for node in ast.walk(tree) if (m := _imported_by_name(node))] == ["flows.data_engine", "tasks"]


def test_the_prefect_runner_is_declared_as_an_entry_point() -> None:
    from mpo.pipeline import find_runner, runner_names

    assert runner_names() == ["local", "prefect"]
    from flows.config import FlowConfig

    assert find_runner("prefect").config_type is FlowConfig

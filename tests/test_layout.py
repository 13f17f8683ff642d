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

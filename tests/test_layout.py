"""The library knows nothing of Prefect: `mpo/` must never import it."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mpo_does_not_import_prefect() -> None:
    offenders = []
    for path in (ROOT / "mpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "prefect"]
    assert offenders == []

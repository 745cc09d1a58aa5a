"""The layout is the architecture: the registry never imports Flower, the Flower app never
imports FastAPI, and the core imports neither. Checked on the source, statically."""

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
FORBIDDEN = {
    "fedssl_core": {"flwr", "fastapi", "starlette", "fedssl_flower", "fedssl_registry"},
    "fedssl_flower": {"fastapi", "starlette", "uvicorn", "sqlalchemy", "fedssl_registry"},
    "fedssl_registry": {"flwr", "fedssl_flower"},
}
# Flower 1.41's SuperLink serves its HTTP APIs with uvicorn itself; fedssl-superlink patches that
# server's shutdown (stop the ServerApps first). Only there is uvicorn Flower's, not the registry's.
ALLOWED = {"fedssl_flower/superlink.py": {"uvicorn"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_forbidden(package):
    files = sorted((SERVICES / package).rglob("*.py"))
    assert files, f"no sources under services/{package}"
    offenders = {str(f.relative_to(SERVICES)): sorted(imported_roots(f) & FORBIDDEN[package] - ALLOWED.get(str(f.relative_to(SERVICES)), set()))
                 for f in files}
    assert {f: bad for f, bad in offenders.items() if bad} == {}

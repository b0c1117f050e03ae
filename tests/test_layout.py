"""The import rules of DESIGN §2, read from the source: who may import what."""

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = {"gateway.types", "gateway.errors", "gateway.config"}
"""What ``connectors`` and ``policies`` may import of ``gateway``."""
SDK_MODULES = {"connectors/mcp.py", "connectors/_stream_call.py", "gateway/server.py"}
"""The only modules that import the MCP SDK."""


def imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            yield node.module


def sources(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def test_connectors_and_policies_import_only_the_shared_gateway_modules() -> None:
    wrong = {
        (str(path.relative_to(ROOT)), module)
        for path in sources("connectors", "policies")
        for module in imports(path)
        if module.split(".")[0] == "gateway" and module not in SHARED
    }
    assert wrong == set()


def test_connectors_and_policies_do_not_import_each_other() -> None:
    wrong = {
        (str(path.relative_to(ROOT)), module)
        for package, other in (("connectors", "policies"), ("policies", "connectors"))
        for path in sources(package)
        for module in imports(path)
        if module.split(".")[0] == other
    }
    assert wrong == set()


def test_only_the_connector_and_the_server_import_the_mcp_sdk() -> None:
    importers = {
        str(path.relative_to(ROOT))
        for path in sources("gateway", "connectors", "policies")
        for module in imports(path)
        if module.split(".")[0] in ("mcp", "mcp_types")
    }
    assert importers == SDK_MODULES

"""The official MCP conformance suite, run against ``patchbay serve`` fronting our conformance fixture.

The suite calls fixed tool, resource and prompt names, so the fixture is served
with ``prefix: ""``: every scenario passes through the whole gateway. The suite
needs Node ≥ 22, installed from the npm registry into ``.cache/conformance``.
"""

from pathlib import Path

import pytest

from tests.conformance_support import ensure_conformance_suite, run_conformance
from tests.support import PYTHON, ROOT, run_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.conformance]

FIXTURE = ROOT / "examples" / "servers" / "conformance.py"
SUITE_DIR = ROOT / ".cache" / "conformance"
EXPECTED_PASSES = 44
"""What the fixture scores on its own with suite 0.1.16; the gateway in front of it must lose none."""


@pytest.mark.timeout(600)
async def test_the_conformance_suite_passes_through_the_gateway(tmp_path: Path) -> None:
    suite = ensure_conformance_suite(SUITE_DIR)  # raises (fails the test) when npm or Node 22 is unavailable
    config = f"servers:\n  conformance: {{command: [{PYTHON}, {FIXTURE}], prefix: ''}}\n"
    async with run_gateway(tmp_path, config) as gw:
        report = run_conformance(suite, gw.url, tmp_path / "results")
    assert report.failed == 0, report.summary()
    assert report.passed >= EXPECTED_PASSES, report.summary()

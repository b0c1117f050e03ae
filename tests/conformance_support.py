"""Install and run the official MCP conformance suite (npm `@modelcontextprotocol/conformance`).

The suite needs Node >= 22 (on Node 20 it crashes on a missing `fs.globSync`); both are
installed into a cache directory by `tests.npm_support`, and the suite runs from there:

    argv = ensure_conformance_suite(cache_dir)
    report = run_conformance(argv, "http://127.0.0.1:9102/mcp", tmp_path / "results")
    assert report.failed == 0, report.summary()

Each scenario writes `<out_dir>/server-<scenario>-<timestamp>/checks.json`: a list of
checks whose `status` is SUCCESS, FAILURE, WARNING or INFO. The report counts those,
as the suite's own `Total: N passed, M failed` line does.

Errors: `ConformanceError` (the suite could not be run; the message holds its output), and
`tests.npm_support.NpmError` when it could not be installed (both fail the test).
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.npm_support import NpmError, NpmPackage, ensure_npm_packages, run

SUITE = NpmPackage("@modelcontextprotocol/conformance", "0.1.16")
RUN_TIMEOUT = 300.0
# `server-<scenario>-2026-01-31T12-00-00-000Z`: the directory the suite writes per scenario.
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
_SCENARIO_LINE = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$", re.MULTILINE)


class ConformanceError(RuntimeError):
    """The conformance suite could not be run; the message carries its output."""


@dataclass(frozen=True)
class ConformanceReport:
    """The outcome of one conformance run."""

    passed: int
    failed: int
    warnings: int
    failed_checks: tuple[str, ...]
    """`scenario/check-id` of every failed check, sorted by scenario."""
    errors: dict[str, str] = field(default_factory=dict)
    """The suite's error message for each failed check, by `scenario/check-id`."""
    output: str = ""
    """The suite's stdout and stderr."""

    def summary(self) -> str:
        """One line of counts, then one line per failed check: for assertion messages."""
        lines = [f"{self.passed} passed, {self.failed} failed, {self.warnings} warnings"]
        lines += [f"  {name}: {self.errors.get(name, '')}" for name in self.failed_checks]
        return "\n".join(lines)


def ensure_conformance_suite(cache_dir: Path) -> list[str]:
    """Install Node 22 and the suite into the npm prefix `cache_dir` unless already there.

    Returns the argv prefix that runs the suite: `[<node 22>, <suite dist/index.js>]`.

    Raises:
        NpmUnavailable: npm is not on PATH.
        NpmError: `npm install` failed or timed out, or the installed Node is not 22+.
    """
    node = ensure_npm_packages(cache_dir, [SUITE])
    return [str(node), str(SUITE.path(cache_dir) / "dist" / "index.js")]


def run_conformance(
    argv_prefix: Sequence[str],
    url: str,
    out_dir: Path,
    extra_args: Sequence[str] = (),
    timeout: float = RUN_TIMEOUT,
) -> ConformanceReport:
    """Run every server scenario (`--suite all`) against the MCP server at `url`.

    `extra_args` go after the defaults, e.g. `("--scenario", "tools-list")` to run one.
    Counts come from the `checks.json` files this run wrote under `out_dir`.

    Raises:
        ConformanceError: the suite timed out, exited with a code other than 0 (all passed)
            or 1 (some failed), or wrote no results.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = set(out_dir.glob("*/checks.json"))
    argv = [*argv_prefix, "server", "--url", url, "--suite", "all", "-o", str(out_dir), *extra_args]
    try:
        result = run(argv, timeout)
    except NpmError as exc:
        raise ConformanceError(str(exc)) from exc
    output = result.stdout + result.stderr
    files = sorted(set(out_dir.glob("*/checks.json")) - earlier)
    if result.returncode not in (0, 1) or not files:
        raise ConformanceError(f"conformance suite exited {result.returncode} with no usable results:\n{output}")
    passed = failed = warnings = 0
    names: list[str] = []
    errors: dict[str, str] = {}
    seen: set[str] = set()
    for path in files:
        match = _RESULT_DIR.match(path.parent.name)
        scenario = match["scenario"] if match else path.parent.name
        seen.add(scenario)
        for check in json.loads(path.read_text()):
            status = check.get("status")
            passed += status == "SUCCESS"
            warnings += status == "WARNING"
            if status == "FAILURE":
                failed += 1
                names.append(f"{scenario}/{check.get('id', '?')}")
                errors[names[-1]] = str(check.get("errorMessage") or "")
    # A scenario that crashes writes no checks.json; the summary on stdout still counts it.
    for line in _SCENARIO_LINE.finditer(result.stdout):
        if line["scenario"] not in seen and int(line["failed"]):
            failed += int(line["failed"])
            names.append(f"{line['scenario']}/run")
            errors[names[-1]] = "the scenario failed to run (see output)"
    if result.returncode == 1 and not failed:
        raise ConformanceError(f"conformance suite exited 1 but reported no failed check:\n{output}")
    return ConformanceReport(passed, failed, warnings, tuple(names), errors, output)

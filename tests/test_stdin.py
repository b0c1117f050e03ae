"""``gateway.stdin``: stdin as lines, waiting in a way cancellation reaches (SIGTERM, ``serve --stdio``); stdout
for messages, written from the event loop."""

import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from gateway.stdin import CHUNK, MessageOut, read_lines

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


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def test_messages_go_to_the_stream_and_stray_output_does_not_until_it_is_restored(pipe: Pipe) -> None:
    out_fd = os.dup(pipe.write_end)  # stands for descriptor 1
    try:
        with MessageOut(out_fd) as out:
            await out.write('{"id": 1, "text": "né"}\n')
            await out.flush()
            assert os.fstat(out_fd).st_ino == os.fstat(2).st_ino  # "descriptor 1" points at stderr meanwhile
        assert drain(pipe.read_end) == '{"id": 1, "text": "né"}\n'.encode()
        assert os.fstat(out_fd).st_ino == os.fstat(pipe.write_end).st_ino  # restored
        assert os.get_blocking(out_fd)  # as it was
    finally:
        os.close(out_fd)


async def test_a_write_to_a_full_pipe_waits_without_blocking_the_loop_and_completes_once_read(pipe: Pipe) -> None:
    big = "x" * (4 * 2**20)  # far more than a pipe holds
    out_fd = os.dup(pipe.write_end)
    received = bytearray()
    try:
        with MessageOut(out_fd) as out:
            async with anyio.create_task_group() as tg:
                tg.start_soon(out.write, big + "\n")
                await anyio.sleep(0.1)  # the writer is waiting on the full pipe, and this task still runs
                os.set_blocking(pipe.read_end, False)
                with anyio.fail_after(10):
                    while len(received) < len(big) + 1:
                        await anyio.wait_readable(pipe.read_end)
                        received += os.read(pipe.read_end, CHUNK)
            with anyio.move_on_after(0.2) as waited:  # and a waiting write can be cancelled
                await out.write(big)
            assert waited.cancelled_caught
    finally:
        os.close(out_fd)
    assert bytes(received) == (big + "\n").encode()

"""This process's stdin as lines, read without a thread that cancellation cannot reach; and its stdout for
MCP messages, written without a thread per write.

``serve --stdio`` must be able to stop while its client keeps stdin open (SIGTERM: close the upstreams, then
exit). A read blocked in a worker thread cannot be cancelled, and the interpreter waits for that thread at exit,
so the process would live on until the client wrote or closed. Here the event loop waits until the descriptor
is readable, then one ``os.read`` takes what is there: that read does not block, and the wait is cancellable.

A descriptor the event loop cannot watch (a regular file or ``/dev/null`` redirected to stdin: epoll refuses
them) is read in a worker thread instead; such a read never waits on a peer, so it ends by itself.

The SDK's stdio server writes each message, then flushes it, each in a worker thread: two thread hops per
message, a fifth of ``serve --stdio``'s CPU per call. :class:`MessageOut` writes from the event loop instead,
waiting (cancellably) only when the pipe is full.
"""

import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Self

import anyio
import anyio.to_thread

CHUNK = 1 << 16
"""Bytes taken from the descriptor per read."""


async def read_lines(fd: int = 0) -> AsyncIterator[bytes]:
    """The lines of ``fd`` as they arrive, each with its ``\\n`` (the last one without, if the input ends so),
    until end of file. Cancellable while it waits for input.

    Raises:
        OSError: reading the descriptor failed.
    """
    buffer = bytearray()
    scanned = 0  # bytes of ``buffer`` known to hold no newline
    pollable = True
    while True:
        if pollable:
            try:
                await anyio.wait_readable(fd)
            except PermissionError:  # epoll refuses regular files and /dev/null: their reads never wait
                pollable = False
        try:
            chunk = os.read(fd, CHUNK) if pollable else await anyio.to_thread.run_sync(os.read, fd, CHUNK)
        except BlockingIOError:  # a descriptor the client made non-blocking, and nothing to read after all
            continue
        if not chunk:
            break
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scanned)) != -1:
            yield bytes(buffer[start : end + 1])
            start = scanned = end + 1
        del buffer[:start]
        scanned = len(buffer)
    if buffer:
        yield bytes(buffer)


class MessageOut:
    """Descriptor 1 as the SDK's stdio server's ``stdout`` (``write`` and ``flush`` of text), for as long as the
    context lasts: the messages go to a private copy of the descriptor, written from the event loop, while
    descriptor 1 itself points at stderr, so that stray output (a ``print``, a child process) cannot corrupt
    the stream (what the SDK does when it opens stdout itself). Restored on exit."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd
        self._out = -1
        self._pollable = True

    def __enter__(self) -> Self:
        self._out = os.dup(self._fd)
        os.dup2(2, self._fd)
        try:
            os.set_blocking(self._out, False)
        except OSError:  # pragma: no cover - a descriptor that cannot be non-blocking: writes may block, briefly
            self._pollable = False
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._pollable:
            os.set_blocking(self._out, True)  # the flag belongs to the open file, which others may share
        os.dup2(self._out, self._fd)
        os.close(self._out)

    async def write(self, text: str) -> None:
        """Write all of ``text`` (UTF-8), waiting while the reader lets the pipe fill."""
        view = memoryview(text.encode())
        while view:
            try:
                written = os.write(self._out, view)
            except BlockingIOError:
                if self._pollable:
                    try:
                        await anyio.wait_writable(self._out)
                        continue
                    except PermissionError:  # epoll refuses regular files: their writes never wait on a peer
                        self._pollable = False
                written = await anyio.to_thread.run_sync(os.write, self._out, view)
            view = view[written:]

    async def flush(self) -> None:
        """Nothing to do: :meth:`write` hands everything to the descriptor."""

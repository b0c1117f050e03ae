"""This process's stdin as lines, read without a thread that cancellation cannot reach.

``serve --stdio`` must be able to stop while its client keeps stdin open (SIGTERM: close the upstreams, then
exit). A read blocked in a worker thread cannot be cancelled, and the interpreter waits for that thread at exit,
so the process would live on until the client wrote or closed. Here the event loop waits until the descriptor
is readable, then one ``os.read`` takes what is there: that read does not block, and the wait is cancellable.

A descriptor the event loop cannot watch (a regular file or ``/dev/null`` redirected to stdin: epoll refuses
them) is read in a worker thread instead; such a read never waits on a peer, so it ends by itself.
"""

import os
from collections.abc import AsyncIterator

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

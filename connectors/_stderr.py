"""A stdio server's stderr, as log lines of its own.

A child process started with the gateway's own stderr would mix what it prints, unlabelled, into every
command's output. Instead it writes to a pipe of its own; a task of the connection reads the pipe line by line
and logs each line at INFO on the logger ``patchbay.upstream.<server>`` as ``<server> | <line>``, and keeps the
last :data:`TAIL_LINES` so that a server that crashes can be reported with the reason it printed.

The pipe's write end goes to the child when it is spawned (:meth:`ServerStderr.spawned` closes the gateway's
copy); the read end lives as long as the connection does: :func:`server_stderr` reads it in a task of its own
task group, and on the way out waits (shielded, briefly) for the child's last lines, then stops the reader and
closes both ends, whatever happened to the child.
"""

import codecs
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

import anyio

__all__ = ["DRAIN_SECONDS", "MAX_LINE", "TAIL_LINES", "ServerStderr", "server_stderr"]

TAIL_LINES = 20
"""How many of its last stderr lines a server's crash is reported with."""
MAX_LINE = 4096
"""Characters of one line logged; a longer line (or output without newlines) is logged in pieces this long."""
DRAIN_SECONDS = 0.5
"""How long the end of a connection waits for the rest of the child's stderr: its last lines, once it has exited
(a descendant that keeps the pipe open cannot hold the connection longer)."""
_CHUNK = 1 << 16


class ServerStderr:
    """The stderr pipe of one stdio server process: what it printed, logged, and its last lines."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.logger = logging.getLogger(f"patchbay.upstream.{server}")
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        """The last lines read (without their newline)."""
        self.ended = anyio.Event()
        """Set when the pipe reached its end: every process holding the write end has exited or closed it."""
        read, write = os.pipe()  # both non-inheritable: the child gets the write end as its descriptor 2 only
        self._read = read
        os.set_blocking(read, False)
        self.writer: TextIO = os.fdopen(write, "w")
        """The write end, for the child's ``stderr``; closed here once the child has its copy."""

    def spawned(self) -> None:
        """The child has its copy of the write end: close the gateway's, so the pipe ends when the child does."""
        self.writer.close()

    def line(self, text: str) -> None:
        self.tail.append(text)
        self.logger.info("%s | %s", self.server, text)

    def report_tail(self, level: int = logging.WARNING) -> None:
        """Log the last lines at ``level`` (a crash's reason), unless each was already logged as it came."""
        if not self.tail:
            return
        if self.logger.isEnabledFor(logging.INFO):
            return  # shown as they came, just above
        for text in self.tail:
            self.logger.log(level, "%s | %s", self.server, text)

    async def pump(self) -> None:
        """Read the pipe to its end, logging each line; the last, unfinished one too."""
        pending = ""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                await anyio.wait_readable(self._read)
                try:
                    chunk = os.read(self._read, _CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                pending += decoder.decode(chunk)
                *lines, pending = pending.split("\n")
                for text in lines:
                    self._emit(text)
                while len(pending) > MAX_LINE:
                    self._emit(pending[:MAX_LINE])
                    pending = pending[MAX_LINE:]
            pending += decoder.decode(b"", final=True)
            if pending:
                self._emit(pending)
        finally:
            self.ended.set()

    def _emit(self, text: str) -> None:
        text = text.rstrip("\r")
        while len(text) > MAX_LINE:
            self.line(text[:MAX_LINE])
            text = text[MAX_LINE:]
        self.line(text)

    def close(self) -> None:
        """Close both ends (the reader must be stopped first)."""
        self.writer.close()
        if self._read >= 0:
            os.close(self._read)
            self._read = -1


@asynccontextmanager
async def server_stderr(server: str) -> AsyncIterator[ServerStderr]:
    """A stderr pipe for a stdio server's process, read (and logged) while the context lasts; then its last
    lines are waited for (at most :data:`DRAIN_SECONDS`, shielded) and both ends closed."""
    stderr = ServerStderr(server)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stderr.pump)
            try:
                yield stderr
            finally:
                stderr.spawned()  # when spawning failed, this is the only write end: the pipe ends at once
                with anyio.move_on_after(DRAIN_SECONDS, shield=True):
                    await stderr.ended.wait()
                tg.cancel_scope.cancel()
    finally:
        stderr.close()

"""The HTTP/1.1 protocol ``patchbay serve`` runs under uvicorn: each request must arrive in time.

uvicorn bounds only the wait after a response (``timeout_keep_alive``), and any byte cancels that
bound: a connection that never sends anything, or sends its headers a byte a second, is held
forever, and a few hundred of them exhaust the process's sockets. Here each request, headers and
body, must arrive in full within ``receive_timeout`` of the connection opening or of the previous
response ending; otherwise the connection is closed (an app still reading the body sees the client
disconnect). Once a request is in, the bound no longer applies: answering it, or streaming to the
client for hours, takes what it takes.

The one module that depends on uvicorn's protocol internals (``H11Protocol``'s ``cycle``, ``loop``,
``transport`` and ``on_response_complete``), which ``tests/test_http_server.py`` pins. The protocol is
always h11's, whether or not httptools is installed, so the bound is the same everywhere.
"""

import logging
from typing import Any, Protocol

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["receive_bounded"]

logger = logging.getLogger(__name__)


class _Timer(Protocol):
    def cancel(self) -> None: ...


class _ReceiveBounded(H11Protocol):
    """``H11Protocol`` closing a connection whose request does not arrive within ``receive_timeout``."""

    receive_timeout: float = 0.0
    """Seconds; set by :func:`receive_bounded` on a subclass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: _Timer | None = None
        self._awaited: object = None
        """The exchange before the request awaited (``None`` on a fresh connection): a newer one is it."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._disarm_once_received()

    def on_response_complete(self) -> None:
        previous = self.cycle
        super().on_response_complete()  # may run a pipelined request that was waiting
        if not self.transport.is_closing():
            self._awaited = previous
            self._arm()
            self._disarm_once_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.receive_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _disarm_once_received(self) -> None:
        cycle = self.cycle
        if cycle is not None and cycle is not self._awaited and not cycle.more_body:
            self._disarm()

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request took over %ss to arrive", self.receive_timeout)
            self.transport.close()


def receive_bounded(receive_timeout: float) -> type[H11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: a request must arrive within ``receive_timeout``
    seconds of the connection opening or of the previous response ending, or the connection is closed."""
    return type("ReceiveBoundedH11Protocol", (_ReceiveBounded,), {"receive_timeout": receive_timeout})

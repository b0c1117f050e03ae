"""The HTTP/1.1 protocol ``patchbay serve`` runs under uvicorn: each request must arrive in time.

uvicorn bounds only the wait after a response (``timeout_keep_alive``), and any byte cancels that
bound: a connection that never sends anything, or sends its headers a byte a second, is held
forever, and a few hundred of them exhaust the process's sockets. Here each request, headers and
body, must arrive in full within ``receive_timeout`` of the connection opening or of the previous
response ending; otherwise the connection is closed (an app still reading the body sees the client
disconnect). Once a request is in, the bound no longer applies: answering it, or streaming to the
client for hours, takes what it takes.

The protocol is uvicorn's httptools one (its parser is C; h11's pure-Python machinery cost about a
tenth of the gateway's CPU per call), with the bound added through the parser's callbacks: armed when
the connection opens and whenever a response ends with no further request already in; disarmed when a
request's message is complete. The one module that depends on uvicorn's protocol internals
(``HttpToolsProtocol``'s ``connection_made``, ``on_message_complete``, ``on_response_complete``,
``connection_lost``, ``loop`` and ``transport``), which ``tests/test_http_server.py`` pins.
"""

import logging
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["receive_bounded"]

logger = logging.getLogger(__name__)


class _Timer(Protocol):
    def cancel(self) -> None: ...


class _ReceiveBounded(HttpToolsProtocol):
    """``HttpToolsProtocol`` closing a connection whose request does not arrive within ``receive_timeout``."""

    receive_timeout: float = 0.0
    """Seconds; set by :func:`receive_bounded` on a subclass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: _Timer | None = None
        self._unanswered = 0
        """Requests received in full whose responses have not ended (more than one when pipelined)."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._arm()

    def on_message_complete(self) -> None:
        answered = self.cycle is not None and self.cycle.response_complete  # before its body was all in
        super().on_message_complete()
        if not answered:
            self._unanswered += 1
            self._disarm()

    def on_response_complete(self) -> None:
        self._unanswered = max(0, self._unanswered - 1)
        super().on_response_complete()  # may start a pipelined request that was waiting
        if not self._unanswered and not self.transport.is_closing():
            self._arm()

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

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.debug("closing a connection whose request took over %ss to arrive", self.receive_timeout)
            self.transport.close()


def receive_bounded(receive_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: a request must arrive within ``receive_timeout``
    seconds of the connection opening or of the previous response ending, or the connection is closed."""
    return type("ReceiveBoundedHttpToolsProtocol", (_ReceiveBounded,), {"receive_timeout": receive_timeout})

"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn times out idle keep-alive connections, and the BodyDeadline middleware times request bodies, but
nothing times the request *head*: a client that opens a connection and sends its headers a byte at a time
holds a connection (and a file descriptor) for as long as it likes. This protocol closes a connection whose
request line and headers have not all arrived `timeout_s` after the connection opened or after the previous
response finished.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """An H11Protocol subclass (for uvicorn.Config(http=...)) that enforces `timeout_s` on request heads."""

    class HeaderDeadlineH11(H11Protocol):
        """Closes connections whose request head does not arrive in time."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            """Start the clock for the first request's head."""
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            """Stop the clock once a request's head has been parsed (a new cycle is running)."""
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()

        def on_response_complete(self) -> None:
            """Start the clock again for the next request on this connection."""
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            """No clock for a closed connection."""
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11

"""uvicorn's h11 protocol with a header timeout: a connection that has not sent a whole request
head within ``header_timeout`` seconds (a slowloris trickling one header a minute, or an idle
socket) is closed. uvicorn itself only times out idle keep-alive connections *between* requests.
The body has its own deadline (:class:`lorasynth.apps.server.middleware.BodyGuard`).
"""

from __future__ import annotations

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """An ``H11Protocol`` subclass (uvicorn's ``http=`` option) closing slow request heads after ``seconds``."""

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:
                self.arm_header_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in
                self.disarm_header_timer()

        def connection_lost(self, exc) -> None:
            self.disarm_header_timer()
            super().connection_lost(exc)

        def arm_header_timer(self) -> None:
            if self.header_timer is None:
                self.header_timer = self.loop.call_later(seconds, self.header_timed_out)

        def disarm_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def header_timed_out(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol

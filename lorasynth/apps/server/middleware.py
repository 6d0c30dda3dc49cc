"""Pure-ASGI guards in front of the routes: a request-body size limit and a loopback Host check."""

from __future__ import annotations

import json

from lorasynth.apps.server.api_errors import ApiError

#: Bind addresses that make the server answer only requests addressed to a loopback name.
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LoopbackHostOnly:
    """On a loopback bind, answer only requests addressed to a loopback name (blocks DNS rebinding:
    a web page whose domain resolves to 127.0.0.1 cannot read this server's answers)."""

    ALLOWED = {b"127.0.0.1", b"localhost", b"[::1]", b"testserver"}  # testserver: FastAPI's test client

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"")
            name = host.rsplit(b":", 1)[0] if not host.endswith(b"]") else host
            if name.lower() not in self.ALLOWED:
                return await send_json(send, 400, "this server only answers requests addressed to 127.0.0.1 or localhost")
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed (pure ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await send_json(send, 400, "invalid Content-Length")
            if too_big:
                # Read (and drop) a moderately oversized body first: a server that answers and closes
                # with unread data makes the client's TCP stack reset, and the 413 itself gets lost.
                if int(length) <= 4 * self.limit:
                    while (await receive()).get("more_body", False):
                        pass
                return await send_json(send, 413, f"request body larger than {self.limit} bytes")
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body larger than {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


async def send_json(send, status: int, message: str) -> None:
    """Answer ``{"error": message}`` directly on the ASGI ``send`` channel and close the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

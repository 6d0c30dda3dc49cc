"""Pure-ASGI guards in front of the routes: exact Host matching, same-origin state changes,
and a request-body size limit with a deadline.

* :class:`HostCheck` answers only requests addressed to a name the server was bound to, with
  the port it listens on (blocks DNS rebinding: a page whose domain resolves to 127.0.0.1
  cannot read this server's answers). ``localhost:7860@evil.com``, ``localhost:evil`` and
  FastAPI's ``testserver`` are refused.
* :class:`SameOriginOnly` refuses a state-changing request (anything but GET, HEAD, OPTIONS)
  that a browser sent from another site (CSRF): its ``Origin`` (or ``Referer``) must be this
  server or an origin given with ``--allow-origin``, and ``Sec-Fetch-Site: cross-site`` /
  ``same-site`` is refused. Clients that send neither header (curl, scripts) are served.
* :class:`BodyGuard` refuses bodies over the upload limit (413) and bodies that do not arrive
  within ``body_timeout`` seconds (408), so a slow client cannot hold a request open forever.
"""

from __future__ import annotations

import json
import re
import time
from urllib.parse import urlsplit

import anyio
from starlette.exceptions import HTTPException

from lorasynth.errors import InputError

#: Bind addresses that make the server answer only requests addressed to a loopback name.
LOOPBACK = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
WILDCARD = ("0.0.0.0", "::", "")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: ``name[:port]``: a DNS name or IPv4 address, or a bracketed IPv6 address; the port digits only.
HOST_RE = re.compile(r"(?P<name>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)(?::(?P<port>[0-9]{1,5}))?")


def bound_host_names(host: str) -> frozenset[str] | None:
    """The Host names a server bound to ``host`` answers (``None``: any well-formed name, for a
    wildcard bind such as 0.0.0.0, whose names cannot be known)."""
    h = host.strip().lower()
    if h in WILDCARD:
        return None
    if h in LOOPBACK or h.startswith("127."):
        return LOOPBACK_NAMES | {h}
    return frozenset({f"[{h}]" if ":" in h else h})


def normalize_origin(url: str) -> str:
    """``scheme://host[:port]`` of an ``--allow-origin`` value (lowercase, default port dropped),
    or one :class:`InputError` line."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"--allow-origin must be an origin like http://localhost:3000, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise InputError(f"--allow-origin has a bad port: {url!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def header(scope, name: bytes) -> str | None:
    """The first value of a request header, decoded as latin-1 (ASGI headers are bytes)."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


class HostCheck:
    """Answer only requests whose ``Host`` is exactly ``name[:port]`` with a bound name and the
    port the server listens on (no port: only on port 80)."""

    def __init__(self, app, names: frozenset[str] | None):
        self.app, self.names = app, names

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal:
                return await send_json(send, 400, refusal)
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> str | None:
        host = header(scope, b"host") or ""
        m = HOST_RE.fullmatch(host)
        server = scope.get("server")
        port = server[1] if server and len(server) > 1 and server[1] else None
        ok = m is not None and (self.names is None or m["name"].lower() in self.names)
        if ok and port is not None:
            ok = int(m["port"]) == port if m["port"] else port == 80
        if ok:
            return None
        if self.names is None:
            return f"bad Host header {host[:100]!r}: expected name:{port or 'port'}"
        names = ", ".join(sorted(self.names))
        return f"this server only answers requests addressed to {names}" + (f" on port {port}" if port else "")


class SameOriginOnly:
    """Refuse state-changing requests a browser sent from another origin (403), unless allowed."""

    def __init__(self, app, allowed: frozenset[str] = frozenset()):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            refusal = self.refusal(scope)
            if refusal:
                return await send_json(send, 403, refusal)
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> str | None:
        own = f"{scope.get('scheme', 'http')}://{(header(scope, b'host') or '').lower()}"
        try:
            own = normalize_origin(own)
        except InputError:
            pass
        origin = header(scope, b"origin")
        site = (header(scope, b"sec-fetch-site") or "").lower()
        if origin is None and header(scope, b"referer"):
            parts = urlsplit(header(scope, b"referer"))
            origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"
        if origin is not None:
            try:
                origin = normalize_origin(origin) if origin != "null" else origin
            except InputError:
                pass
            if origin in self.allowed or (origin == own and site not in ("cross-site", "same-site")):
                return None
            return (f"cross-origin request refused: {scope['method']} from {origin[:100]!r}; this server only accepts "
                    f"changes from its own page (start it with --allow-origin ORIGIN to allow another)")
        if site in ("cross-site", "same-site"):
            return (f"cross-site request refused (Sec-Fetch-Site: {site}); this server only accepts changes from "
                    f"its own page")
        return None


class BodyGuard:
    """Refuse request bodies over ``limit`` bytes with 413, before they are parsed, and bodies
    not received within ``timeout`` seconds with 408 (pure ASGI)."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit() or len(length) > 18:
                return await send_json(send, 400, "invalid Content-Length")
            if int(length) > self.limit:
                # Read (and drop) a moderately oversized body first: a server that answers and closes
                # with unread data makes the client's TCP stack reset, and the 413 itself gets lost.
                if int(length) <= 4 * self.limit:
                    with anyio.move_on_after(self.timeout):
                        while (await receive()).get("more_body", False):
                            pass
                return await send_json(send, 413, f"request body larger than {self.limit} bytes")
        deadline = time.monotonic() + self.timeout
        seen, done = 0, False

        async def guarded():
            nonlocal seen, done
            if done:  # the body is in: what follows (a disconnect) may take as long as it takes
                return await receive()
            message = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                message = await receive()
            if message is None:
                raise HTTPException(408, f"request body not received within {self.timeout:g} s")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.limit:
                    raise HTTPException(413, f"request body larger than {self.limit} bytes")
            return message

        return await self.app(scope, guarded, send)


async def send_json(send, status: int, message: str) -> None:
    """Answer ``{"error": message}`` directly on the ASGI ``send`` channel and close the connection."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

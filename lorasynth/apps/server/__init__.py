"""The local web app and HTTP API (``lorasynth serve``).

    from lorasynth.apps.server import ServerConfig, create_app
    app = create_app(ServerConfig(model="model", base="base", library="lib"))

``backend.py`` is the only module that calls into lorasynth; ``app.py`` wires the app
(config, middleware, error handlers, routers); ``routes/`` holds one router per resource
(info, faces, loras, blend, previews, library); ``context.py`` the state and helpers they
share; ``api_errors.py`` the ``{"error": ...}`` contract; ``middleware.py`` the exact-Host,
same-origin (CSRF) and body size / deadline guards; ``protocol.py`` uvicorn's protocol with a
header timeout; ``jobs.py`` the single generation worker; ``results.py`` the in-memory LoRA
store (a byte budget); ``static/`` the page (plain HTML/JS/CSS, no build step, nothing
fetched from the network).
"""

from lorasynth.apps.server.config import ServerConfig


def create_app(cfg: ServerConfig, backend=None):
    from lorasynth.apps.server.app import create_app as create

    return create(cfg, backend)


__all__ = ["ServerConfig", "create_app"]

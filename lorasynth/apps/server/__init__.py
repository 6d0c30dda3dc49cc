"""The local web app and HTTP API (``lorasynth serve``).

    from lorasynth.apps.server import ServerConfig, create_app
    app = create_app(ServerConfig(model="model", base="base", library="lib"))

``backend.py`` is the only module that calls into lorasynth; ``app.py`` holds the routes;
``jobs.py`` the single generation worker; ``static/`` the page (plain HTML/JS/CSS, no build
step, nothing fetched from the network).
"""

from lorasynth.apps.server.config import ServerConfig


def create_app(cfg: ServerConfig, backend=None):
    from lorasynth.apps.server.app import create_app as _create

    return _create(cfg, backend)


__all__ = ["ServerConfig", "create_app"]

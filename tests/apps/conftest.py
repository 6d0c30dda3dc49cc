"""Fixtures of the server and browser tests: the shared test world and its server config, one uvicorn
server and one browser page per module. A module that needs a different page (test_web_a11y,
test_web_infotext) defines its own."""

from __future__ import annotations

import pytest

from lorasynth.apps.server import ServerConfig
from server_helpers import astronaut_png_bytes, shared_server_world
from web_helpers import browser_context, open_page, running_server


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_server_world(tmp_path_factory)


@pytest.fixture(scope="module")
def cfg(world):
    return ServerConfig(model=str(world["model"]), base=str(world["base"]), library=str(world["library"]))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    with browser_context(tmp_path_factory) as context:
        yield open_page(context, server)


@pytest.fixture(scope="module")
def astro_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    path.write_bytes(astronaut_png_bytes())
    return path

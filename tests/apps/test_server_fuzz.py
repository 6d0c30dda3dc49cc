"""Protocol fuzzing of the HTTP API with ``schemathesis``, driven by the server's own OpenAPI spec.

Every operation in ``/openapi.json`` gets generated requests, valid ones and ones that break the
schema (positive and negative modes): no answer may be a 5xx, and every 4xx must be JSON with
an ``"error"`` key. Bounded and derandomized (the same examples every run), on the tiny model,
with small generation limits so preview jobs stay cheap.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.generation import GenerationMode

from lorasynth.apps.server import ServerConfig, create_app
from lorasynth.apps.server.backend import Backend
from server_helpers import shared_server_world

BASE = "http://127.0.0.1:7860"
EXAMPLES = 25  # per operation and mode


def spec() -> dict:
    """The server's OpenAPI spec, as ``/openapi.json`` serves it (the routes do not touch the backend
    to describe themselves, so a placeholder stands in for the loaded models here, at collection)."""
    from types import SimpleNamespace

    return create_app(ServerConfig(model="(spec only)"), backend=SimpleNamespace()).openapi()


schema = schemathesis.openapi.from_dict(spec())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES,
                                deterministic=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    world = shared_server_world(tmp_path_factory)
    cfg = ServerConfig(model=str(world["model"]), base=str(world["base"]), library=str(world["library"]),
                       max_steps=2, max_side=64, max_samples=2, queue_size=2, map_points=200)
    backend = Backend(cfg)
    app = create_app(cfg, backend)
    assert app.openapi() == schema.raw_schema, "the fuzzed spec is not the served one"
    yield app
    backend.close()


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_endpoint_answers_4xx_json_never_5xx(app, case):
    response = case.call(app=app, base_url=BASE)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), where
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], where

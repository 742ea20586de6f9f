"""The committed OpenAPI document matches the generator and the routes served."""

from __future__ import annotations

import json

from adloop.streams.config import Settings
from adloop.streams.openapi import OPENAPI_PATH, stale
from adloop.streams.serving import ServingApi


def test_committed_openapi_is_current() -> None:
    assert stale() == [], "run `adloop schemas --write` and commit streams/openapi.json"


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    app = ServingApi(Settings(broker="kafka://127.0.0.1:1")).web_app()
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD"
    }
    spec = json.loads(OPENAPI_PATH.read_text())
    documented = {(m, path) for path, ops in spec["paths"].items() for m in ops}
    assert served == documented

"""The serving API's OpenAPI document, generated from the request/response types.

``streams/openapi.json`` is committed (``adloop schemas --write``); a test checks
it matches both this generator and the routes the app really serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from adloop.schemas import CampaignSettings, Creative, Decision
from adloop.streams.auth import ROUTE_PERMISSIONS
from adloop.streams.serving import (
    BatchSelectRequest,
    BatchSelectResponse,
    BestResponse,
    CreativeDraft,
    CreativeList,
    ErrorResponse,
    Health,
    Readiness,
    SelectRequest,
    SelectResponse,
)
from adloop.streams.steering import Action, AuditTrail, ReviewQueue, SettingsUpdate, Story

OPENAPI_PATH = Path(__file__).resolve().parent / "openapi.json"

_CAMPAIGN = {"name": "campaign", "in": "path", "required": True, "schema": {"type": "string"}}
_AUDIENCE = {"name": "audience", "in": "path", "required": True, "schema": {"type": "string"}}
_CREATIVE = {"name": "creative_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _creative_action(verb: str, what: str, returns: type) -> tuple:
    return (
        "post",
        f"/v1/creatives/{{creative_id}}/{verb}",
        what,
        Action,
        {
            200: ("done; the updated record", returns),
            400: ("invalid body", ErrorResponse),
            404: ("unknown creative", ErrorResponse),
            409: ("not allowed from the creative's status, or a concurrent write", ErrorResponse),
        },
        [_CREATIVE],
    )


# (method, path, summary, request type, {status: (description, type)}, path params)
ROUTES: list[tuple[str, str, str, type | None, dict[int, tuple[str, type]], list[dict]]] = [
    ("get", "/healthz", "Liveness and what the server knows", None, {200: ("ok", Health)}, []),
    (
        "get",
        "/readyz",
        "Readiness: followers caught up and running, newest decision's age, decode errors",
        None,
        {200: ("ready", Readiness), 503: ("not ready; reasons listed", Readiness)},
        [],
    ),
    (
        "get",
        "/metrics",
        "Prometheus metrics (text exposition format)",
        None,
        {200: ("metrics", str)},
        [],
    ),
    (
        "post",
        "/v1/select",
        "Thompson-sample a creative; returns a fresh impression_id and its propensity to log",
        SelectRequest,
        {
            200: ("the creative to show", SelectResponse),
            400: ("invalid request body", ErrorResponse),
            404: ("unknown campaign, or no active creative for the audience", ErrorResponse),
        },
        [],
    ),
    (
        "post",
        "/v1/select/batch",
        "n independent choices at once, each with its impression_id and propensity to log",
        BatchSelectRequest,
        {
            200: ("the creatives to show", BatchSelectResponse),
            400: ("invalid request body", ErrorResponse),
            404: ("unknown campaign, or no active creative for the audience", ErrorResponse),
        },
        [],
    ),
    (
        "post",
        "/v1/creatives",
        "Register a human-written creative (active), or edit one's text (back to review). "
        "Status, origin, lineage, history and priors are adloop's: unknown fields are refused",
        CreativeDraft,
        {
            200: ("edited (pending review), or unchanged", Creative),
            201: ("registered", Creative),
            400: ("invalid creative or unknown field", ErrorResponse),
            409: (
                "creative_id belongs to another campaign; a generated, rejected or retired "
                "creative; or a concurrent write won",
                ErrorResponse,
            ),
        },
        [],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/creatives",
        "A campaign's creatives",
        None,
        {200: ("creatives", CreativeList), 404: ("unknown campaign", ErrorResponse)},
        [_CAMPAIGN],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/audiences/{audience}/best",
        "Current best creative with posterior mean, 95% credible interval and counts",
        None,
        {
            200: ("best creative", BestResponse),
            404: ("unknown campaign or audience without traffic", ErrorResponse),
        },
        [_CAMPAIGN, _AUDIENCE],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/audiences/{audience}/decision",
        "The full ranked decision (as on the decisions topic)",
        None,
        {
            200: ("decision", Decision),
            404: ("unknown campaign or audience without traffic", ErrorResponse),
        },
        [_CAMPAIGN, _AUDIENCE],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/settings",
        "The campaign's settings (brief, auto_approve, pause, pins, budget)",
        None,
        {200: ("settings", CampaignSettings)},
        [_CAMPAIGN],
    ),
    (
        "put",
        "/v1/campaigns/{campaign}/settings",
        "Change settings (fields given only; brief and audience descriptions: editor, the "
        "rest: admin). If-Match: the ETag of GET. One audit entry with the field diff",
        SettingsUpdate,
        {
            200: ("new settings", CampaignSettings),
            400: ("invalid body, unknown field or unsafe text", ErrorResponse),
            409: ("stale If-Match, or a concurrent write won", ErrorResponse),
        },
        [_CAMPAIGN],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/review",
        "Generated candidates waiting for approval, best predicted CTR first",
        None,
        {200: ("review queue", ReviewQueue)},
        [_CAMPAIGN],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/story",
        "Every creative with its story: lineage, trigger, prior, live CTR per audience, "
        "label, status changes",
        None,
        {200: ("story", Story), 404: ("unknown campaign", ErrorResponse)},
        [_CAMPAIGN],
    ),
    (
        "get",
        "/v1/campaigns/{campaign}/audit",
        "Audit trail, newest first",
        None,
        {200: ("audit trail", AuditTrail)},
        [_CAMPAIGN],
    ),
    _creative_action("approve", "Approve a generated candidate: it goes live", Creative),
    _creative_action("reject", "Reject a generated candidate", Creative),
    _creative_action("pin", "Pin a creative: the loop never retires it", CampaignSettings),
    _creative_action("unpin", "Unpin a creative", CampaignSettings),
]


def build() -> dict[str, Any]:
    types: list[Any] = []
    for _, _, _, request, responses, _ in ROUTES:
        if request is not None:
            types.append(request)
        types.extend(t for _, t in responses.values() if t is not str)
    types.append(ErrorResponse)
    unique = list(dict.fromkeys(types))
    schemas, components = msgspec.json.schema_components(
        unique, ref_template="#/components/schemas/{name}"
    )
    ref = dict(zip(unique, schemas, strict=True))
    paths: dict[str, Any] = {}
    for method, path, summary, request, responses, params in ROUTES:
        permission = ROUTE_PERMISSIONS[(method.upper(), path)]
        content = {
            status: (
                {"text/plain": {"schema": {"type": "string"}}}
                if rtype is str
                else {"application/json": {"schema": ref[rtype]}}
            )
            for status, (_, rtype) in responses.items()
        }
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": {
                str(status): {"description": description, "content": content[status]}
                for status, (description, _) in responses.items()
            },
        }
        if permission is not None:
            # streams/auth.py: the role permission this route needs.
            operation["security"] = [{"bearer": []}]
            operation["x-adloop-permission"] = permission
            error = {"application/json": {"schema": ref[ErrorResponse]}}
            operation["responses"]["401"] = {"description": "no or bad token", "content": error}
            operation["responses"]["403"] = {
                "description": "the token's role or campaigns do not allow it",
                "content": error,
            }
        if params:
            operation["parameters"] = params
        if request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref[request]}},
            }
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "adloop serving API",
            "version": "1",
            "description": "Which creative to show, creative registration, and steering "
            "the loop (settings, review, pins, story, audit).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def write(path: Path = OPENAPI_PATH) -> Path:
    path.write_text(render())
    return path


def stale(path: Path = OPENAPI_PATH) -> list[str]:
    return [] if path.exists() and path.read_text() == render() else [path.name]

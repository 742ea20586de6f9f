"""Tokens, roles and the route permissions (streams/auth.py), without the stack."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adloop.streams.auth import (
    ROLE_PERMISSIONS,
    ROUTE_PERMISSIONS,
    TokenStore,
    auth_middleware,
    ensure_admin_token,
    principal_of,
)


def test_a_token_is_stored_hashed_in_a_private_file(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, secret = store.create("alice", "reviewer", ["spring"])
    text = (tmp_path / "tokens.json").read_text()
    assert secret not in text and secret.split("_")[-1] not in text
    assert record.sha256 in text
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    principal = TokenStore(tmp_path / "tokens.json").authenticate(secret)
    assert principal is not None
    assert (principal.name, principal.role, principal.campaigns) == (
        "alice",
        "reviewer",
        ("spring",),
    )
    assert principal.actor == "human:alice"


def test_wrong_forged_and_revoked_tokens_do_not_authenticate(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, secret = store.create("bob", "admin")
    assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.authenticate("adl_000000000000_" + "x" * 43) is None
    assert store.authenticate("not a token") is None
    # Another process revokes it: this store sees the file change.
    TokenStore(tmp_path / "tokens.json").revoke(record.token_id)
    assert store.authenticate(secret) is None


def test_names_and_roles_are_validated(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    with pytest.raises(ValueError, match="token name"):
        store.create("Alice Smith\n", "viewer")
    with pytest.raises(ValueError, match="role"):
        store.create("alice", "root")  # type: ignore[arg-type]


def test_roles_grant_what_the_issue_lists() -> None:
    assert ROLE_PERMISSIONS["exchange"] == {"select"}
    assert ROLE_PERMISSIONS["viewer"] == {"read"}
    assert ROLE_PERMISSIONS["editor"] == {"read", "edit"}
    assert ROLE_PERMISSIONS["reviewer"] == {"read", "review"}
    assert {"admin", "edit", "review", "read", "select"} <= ROLE_PERMISSIONS["admin"]


def test_the_admin_token_of_the_embedded_stack_is_made_once(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    secret, created = ensure_admin_token(store, tmp_path / "admin-token")
    assert created and stat.S_IMODE((tmp_path / "admin-token").stat().st_mode) == 0o600
    again, created_again = ensure_admin_token(store, tmp_path / "admin-token")
    assert (again, created_again) == (secret, False)
    principal = store.authenticate(secret)
    assert principal is not None and principal.role == "admin"


def _client(store: TokenStore, select_requires_token: bool) -> TestClient:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"actor": principal_of(request).actor})

    app = web.Application(middlewares=[auth_middleware(store, select_requires_token)])
    for method, path in ROUTE_PERMISSIONS:
        app.router.add_route(method, path, handler)
    app.router.add_get("/v1/undeclared", handler)
    return TestClient(TestServer(app))


def test_the_middleware_checks_each_routes_permission(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    _, viewer = store.create("vic", "viewer", ["spring"])
    _, reviewer = store.create("rita", "reviewer")
    _, exchange = store.create("ex", "exchange")

    async def scenario() -> dict[str, int]:
        client = _client(store, select_requires_token=True)
        await client.start_server()
        try:

            async def status(method: str, path: str, token: str | None) -> int:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                response = await client.request(method, path, headers=headers)
                return response.status

            return {
                "health": await status("GET", "/healthz", None),
                "read_anonymous": await status("GET", "/v1/campaigns/spring/review", None),
                "read_viewer": await status("GET", "/v1/campaigns/spring/review", viewer),
                "read_other_campaign": await status("GET", "/v1/campaigns/fall/review", viewer),
                "approve_viewer": await status("POST", "/v1/creatives/c1/approve", viewer),
                "approve_reviewer": await status("POST", "/v1/creatives/c1/approve", reviewer),
                "settings_reviewer": await status("PUT", "/v1/campaigns/spring/settings", reviewer),
                "select_anonymous": await status("POST", "/v1/select", None),
                "select_exchange": await status("POST", "/v1/select", exchange),
                "bad_token": await status("GET", "/v1/campaigns/spring/review", "adl_nope"),
                "undeclared": await status("GET", "/v1/undeclared", reviewer),
            }
        finally:
            await client.close()

    assert asyncio.run(scenario()) == {
        "health": 200,
        "read_anonymous": 401,
        "read_viewer": 200,
        "read_other_campaign": 403,
        "approve_viewer": 403,
        "approve_reviewer": 200,
        "settings_reviewer": 403,
        "select_anonymous": 401,
        "select_exchange": 200,
        "bad_token": 401,
        "undeclared": 403,
    }


def test_select_can_be_open_on_loopback(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")

    async def scenario() -> tuple[int, dict]:
        client = _client(store, select_requires_token=False)
        await client.start_server()
        try:
            response = await client.post("/v1/select")
            return response.status, await response.json()
        finally:
            await client.close()

    assert asyncio.run(scenario()) == (200, {"actor": "anonymous"})

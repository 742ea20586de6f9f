"""The attacks of the trust issue, against the real stack (embedded broker, real
processes): every one gets a clear 4xx and changes nothing; every change writes one
audit entry whose actor is the token's name; the audit chains show tampering."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from urllib.parse import quote

import msgspec
import pytest

from adloop.bench.exchange import HttpSelector
from adloop.schemas import AuditEntry, Creative
from adloop.streams.auth import TokenStore
from adloop.streams.config import Settings
from adloop.streams.supervisor import settings_env

from stack import Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(broker, tmp_path_factory) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    settings = Settings(
        topic_prefix="probe.", data_dir=tmp_path_factory.mktemp("probe") / "data"
    ).for_embedded_broker(broker.url)
    s = Stack(settings).start()
    s.register(
        Creative(creative_id="p1", campaign="spring", headline="Spring sale"),
        Creative(creative_id="p2", campaign="spring", headline="Free shipping today"),
        Creative(creative_id="f1", campaign="fall", headline="Fall colours"),
    )
    try:
        yield s
    finally:
        s.stop()


def client(stack: Stack, role: str | None, campaigns: tuple[str, ...] = ("*",)) -> HttpSelector:
    token = None
    if role is not None:
        _, token = TokenStore(stack.settings.tokens_path).create(
            f"probe-{role}-{'-'.join(c.strip('*') or 'all' for c in campaigns)}",
            role,  # type: ignore[arg-type]
            campaigns,
        )
    return HttpSelector(stack.settings.api_host, stack.settings.api_port, token)


def settings_of(stack: Stack, campaign: str) -> dict:
    status, body = stack.get(f"/v1/campaigns/{campaign}/settings")
    assert status == 200
    return body


def audit_entries(stack: Stack, campaign: str) -> list[dict]:
    status, body = stack.get(f"/v1/campaigns/{campaign}/audit")
    assert status == 200
    return body["entries"]


def test_unauthenticated_and_wrong_role_writes_are_refused(stack: Stack) -> None:
    before = settings_of(stack, "spring")
    anonymous, viewer, editor = (
        client(stack, None),
        client(stack, "viewer"),
        client(stack, "editor"),
    )
    reviewer_fall = client(stack, "reviewer", ("fall",))
    attempts = [
        (anonymous, "PUT", "/v1/campaigns/spring/settings", {"auto_approve": True}, 401),
        (anonymous, "POST", "/v1/creatives/p1/approve", {}, 401),
        (anonymous, "GET", "/v1/campaigns/spring/audit", None, 401),
        (viewer, "PUT", "/v1/campaigns/spring/settings", {"auto_approve": True}, 403),
        (viewer, "POST", "/v1/creatives", {"creative_id": "x", "campaign": "spring",
                                           "headline": "x"}, 403),
        (editor, "PUT", "/v1/campaigns/spring/settings", {"auto_approve": True}, 403),
        (editor, "POST", "/v1/creatives/p1/pin", {}, 403),
        (reviewer_fall, "POST", "/v1/creatives/p1/pin", {}, 403),
    ]  # fmt: skip
    for api, method, path, body, expected in attempts:
        status, answer = api.call(method, path, body)
        assert status == expected, (method, path, answer)
        assert answer["error"] and answer["message"]
    assert settings_of(stack, "spring") == before
    assert stack.get("/v1/campaigns/spring/creatives")[1]["creatives"][0]["status"] == "active"


def test_server_owned_fields_and_typos_are_refused(stack: Stack) -> None:
    admin = client(stack, "admin")
    forged = {
        "creative_id": "p2",
        "campaign": "spring",
        "headline": "Approved by the CEO",
        "status": "active",
        "origin": "human",
        "prior_strength": 999000.0,
        "predicted_ctr": 0.999,
        "history": [{"at": 1.0, "actor": "human:ceo", "action": "approved", "status": "active"}],
    }
    status, answer = admin.call("POST", "/v1/creatives", forged)
    assert status == 400 and "status" in answer["message"]
    status, answer = admin.call("PUT", "/v1/campaigns/spring/settings", {"autoApprove": True})
    assert status == 400 and "autoApprove" in answer["message"]
    p2 = next(
        c for c in stack.get("/v1/campaigns/spring/creatives")[1]["creatives"]
        if c["creative_id"] == "p2"
    )  # fmt: skip
    assert p2["headline"] == "Free shipping today" and p2["prior_strength"] is None


def test_settings_that_readers_could_not_decode_are_refused(stack: Stack) -> None:
    admin = client(stack, "admin")
    before = settings_of(stack, "spring")
    bad_bodies = [
        {"audience_descriptions": {"students": "x" * 600}},
        {"audience_descriptions": {"students\nnew line": "ok"}},
        {"audience_descriptions": {"students": "right-to-left\u202e mark"}},
        {"brief": {"product": "shoes\u200b", "key_message": "hidden zero width"}},
        {"n_variants": 0},
    ]
    for body in bad_bodies:
        status, answer = admin.call("PUT", "/v1/campaigns/spring/settings", body)
        assert status == 400, (body, answer)
    for campaign in ("with space", "é", "a/b", "x" * 5000):
        status, answer = admin.call("PUT", f"/v1/campaigns/{quote(campaign, safe='')}/settings",
                                    {"paused": True})  # fmt: skip
        assert status in (400, 404), (campaign, answer)
    assert settings_of(stack, "spring") == before


def test_a_generated_or_rejected_creative_is_not_revived_by_an_edit(stack: Stack) -> None:
    generated = Creative(
        creative_id="g1", campaign="spring", headline="Generated one", origin="generated",
        status="pending_review", version=1,
    )  # fmt: skip
    stack.publish("creatives", "g1", msgspec.json.encode(generated))
    stack.flush()
    stack.wait_for(lambda: stack.get("/v1/campaigns/spring/review")[1]["candidates"], 120)
    reviewer, editor = client(stack, "reviewer"), client(stack, "editor")
    assert reviewer.call("POST", "/v1/creatives/g1/reject", {"reason": "off brand"})[0] == 200
    status, answer = editor.call(
        "POST", "/v1/creatives",
        {"creative_id": "g1", "campaign": "spring", "headline": "Back from the dead"},
    )  # fmt: skip
    assert status == 409 and answer["error"] == "generated_creative"
    g1 = next(c for c in stack.get("/v1/campaigns/spring/creatives")[1]["creatives"]
              if c["creative_id"] == "g1")  # fmt: skip
    assert (g1["status"], g1["headline"]) == ("rejected", "Generated one")


def test_editing_an_active_creative_sends_it_back_to_review_with_one_audit_entry(
    stack: Stack,
) -> None:
    editor = client(stack, "editor")
    entries = len(audit_entries(stack, "fall"))
    status, edited = editor.call(
        "POST", "/v1/creatives",
        {"creative_id": "f1", "campaign": "fall", "headline": "Fall colours, 20% off",
         "reason": "new offer"},
    )  # fmt: skip
    assert status == 200 and edited["status"] == "pending_review"
    trail = audit_entries(stack, "fall")
    assert len(trail) == entries + 1
    newest = trail[0]
    assert newest["action"] == "creative_edited"
    assert newest["actor"] == "human:probe-editor-all"
    assert newest["details"]["headline"] == "'Fall colours' -> 'Fall colours, 20% off'"


def test_racing_writes_lose_nothing(stack: Stack) -> None:
    admin, reviewer = client(stack, "admin"), client(stack, "reviewer")
    for round_ in range(5):
        want_auto = round_ % 2 == 0
        results: dict[str, int] = {}

        def put_settings(want: bool = want_auto, results: dict[str, int] = results) -> None:
            results["put"] = admin.call(
                "PUT", "/v1/campaigns/spring/settings", {"auto_approve": want}
            )[0]

        def pin(n: int = round_, results: dict[str, int] = results) -> None:
            verb = "pin" if n % 2 == 0 else "unpin"
            results["pin"] = reviewer.call("POST", f"/v1/creatives/p1/{verb}", {})[0]

        threads = [threading.Thread(target=put_settings), threading.Thread(target=pin)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == {"put": 200, "pin": 200}
        now = settings_of(stack, "spring")
        assert now["auto_approve"] is want_auto, round_
        assert ("p1" in now["pinned"]) is (round_ % 2 == 0), round_
    # A write based on an old version is refused, and changes nothing.
    current = settings_of(stack, "spring")
    api = client(stack, "admin")
    api_headers_conn = api.conn
    api_headers_conn.request(
        "PUT", "/v1/campaigns/spring/settings", json.dumps({"paused": True}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {api.token}",
         "If-Match": f'"{current["version"] - 1}"'},
    )  # fmt: skip
    response = api_headers_conn.getresponse()
    answer = json.loads(response.read())
    assert response.status == 409 and answer["error"] == "stale_version"
    assert settings_of(stack, "spring") == current


def test_one_id_for_two_campaigns_is_registered_once(stack: Stack) -> None:
    results: dict[str, int] = {}

    def register(campaign: str) -> None:
        results[campaign] = client(stack, "editor").call(
            "POST", "/v1/creatives",
            {"creative_id": "dup1", "campaign": campaign, "headline": f"Mine, {campaign}"},
        )[0]  # fmt: skip

    threads = [threading.Thread(target=register, args=(c,)) for c in ("spring", "fall")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [201, 409]
    owners = {
        c for c in ("spring", "fall")
        if any(x["creative_id"] == "dup1"
               for x in stack.get(f"/v1/campaigns/{c}/creatives")[1]["creatives"])
    }  # fmt: skip
    assert len(owners) == 1


def test_every_change_has_one_audit_entry_by_the_tokens_actor(stack: Stack) -> None:
    reviewer = client(stack, "reviewer", ("spring",))
    before = audit_entries(stack, "spring")
    assert reviewer.call("POST", "/v1/creatives/p2/pin", {"reason": "keep"})[0] == 200
    assert reviewer.call("POST", "/v1/creatives/p2/pin", {"reason": "again"})[0] == 200  # no-op
    after = audit_entries(stack, "spring")
    new = after[: len(after) - len(before)]
    assert [(e["action"], e["actor"], e["creative_id"]) for e in new] == [
        ("pinned", "human:probe-reviewer-spring", "p2")
    ]
    assert new[0]["writer"].startswith("serve-") and new[0]["seq"] >= 1


def _verify(stack: Stack) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adloop", "audit", "verify"],
        env=settings_env(stack.sup.settings),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_audit_verify_detects_forged_and_edited_entries(stack: Stack) -> None:
    clean = _verify(stack)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "audit trail verified" in clean.stdout
    # Produced straight to Kafka, without the audit key: a forged approval.
    forged = AuditEntry(
        at=1.0, actor="human:ceo", campaign="spring", action="settings_changed",
        details={"auto_approve": True}, writer="serve-forger", seq=1, prev_hash="0" * 64,
        hash="f" * 64,
    )  # fmt: skip
    stack.publish("audit", "spring", msgspec.json.encode(forged))
    # An existing sealed entry, edited.
    real = audit_entries(stack, "spring")[-1]
    real["actor"] = "human:mallory"
    stack.publish("audit", "spring", json.dumps(real).encode())
    stack.flush()
    tampered = _verify(stack)
    assert tampered.returncode == 1
    assert "serve-forger #1: hash does not match" in tampered.stdout
    assert f"{real['writer']} #{real['seq']}: hash does not match" in tampered.stdout

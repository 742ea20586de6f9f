"""The chaos bench's pure parts: its kill plan and its event stream (the run itself is
`adloop bench chaos`, with its figures in the README)."""

from __future__ import annotations

from collections import Counter

import msgspec

from adloop.bench.chaos import CLICK_LAG, chaos_events, kill_plan
from adloop.streams.supervisor import ALL_ROLES


def test_the_kill_plan_kills_every_role_as_often_as_asked_at_seeded_event_counts() -> None:
    plan = kill_plan(200_000, 5, seed=7)
    assert Counter(role for _, role in plan) == {role: 5 for role in ALL_ROLES}
    counts = [at for at, _ in plan]
    assert counts == sorted(counts)
    assert all(0.03 * 200_000 <= at <= 0.90 * 200_000 for at in counts)
    assert plan == kill_plan(200_000, 5, seed=7)
    assert plan != kill_plan(200_000, 5, seed=8)


def test_the_events_match_their_expected_counts_and_each_click_follows_its_impression() -> None:
    stream, expected = chaos_events(5_000, seed=3)
    seen: dict[str, tuple[str, float]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for role, key, value in stream:
        event = msgspec.json.decode(value)
        assert key.decode() == event["impression_id"]
        if role == "impressions":
            cell = f"{event['campaign']}|{event['audience']}"
            seen[event["impression_id"]] = (cell, event["timestamp"])
            counts[(cell, "i")] += 1
        else:
            cell, at = seen[event["impression_id"]]  # published after its impression
            assert event["timestamp"] == at + CLICK_LAG * 1e-3
            counts[(cell, "c")] += 1
    assert {k: (counts[(k, "i")], counts[(k, "c")]) for k in expected} == expected
    assert sum(i + c for i, c in expected.values()) == len(stream)

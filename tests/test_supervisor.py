"""The supervisor restarts a dead role with backoff and shows a crash loop.

The restart policy is pure (every method takes the time); one integration test kills a
real role on the embedded broker and checks that the stack carries on.
"""

from __future__ import annotations

import signal
import time

import pytest

from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.supervisor import RestartPolicy, RoleHealth

from stack import Stack, click, imp

POLICY = RestartPolicy(first_delay_s=1.0, max_delay_s=8.0, stable_after_s=60.0, crash_loop_exits=4)


def test_backoff_doubles_up_to_the_cap() -> None:
    health = RoleHealth(POLICY)
    now = 0.0
    health.on_started(now)
    delays = []
    for _ in range(6):
        now += 1.0
        delays.append(health.on_exit(now, code=1))
        assert not health.due(now)
        now += delays[-1]
        assert health.due(now)
        health.on_started(now)
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0]
    assert delays[4:] == [8.0, 8.0]


def test_a_role_that_ran_long_enough_starts_over_at_the_first_delay() -> None:
    health = RoleHealth(POLICY)
    health.on_started(0.0)
    assert health.on_exit(1.0, 1) == 1.0
    health.on_started(2.0)
    assert health.on_exit(3.0, 1) == 2.0
    health.on_started(5.0)
    # Ran 100 s (> stable_after_s): a fresh failure, not the third in a row.
    assert health.on_exit(105.0, 1) == 1.0


def test_crash_loop_state_after_many_exits_in_the_window() -> None:
    health = RoleHealth(POLICY)
    now = 0.0
    health.on_started(now)
    states = []
    for _ in range(4):
        now += 0.5
        health.on_exit(now, code=2)
        states.append(health.state(now))
        now = health.next_start_at or now
        health.on_started(now)
        states.append(health.state(now))
    assert states[:2] == ["restarting", "running"]
    assert states[-2] == "crash_loop"
    assert health.last_exit_code == 2
    # Long after, the old exits leave the window: no longer a crash loop.
    assert not health.crash_loop(now + POLICY.crash_loop_window_s + 1)


@pytest.mark.integration
def test_a_killed_role_is_restarted_and_the_stack_keeps_counting(settings: Settings) -> None:
    stack = Stack(settings).start()
    try:
        stack.register(Creative(creative_id="c1", campaign="k", headline="Ad one"))
        stack.publish("impressions", "before", imp("before", "c1", "a", campaign="k"))
        stack.flush()
        stack.wait_for(lambda: stack.counts("k", "a").get("c1") == (1, 0), 120, "first count")

        for role in ("ingest", "worker"):
            stack.sup.kill(role, signal.SIGKILL)
        states: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = stack.sup.supervise()
            if all(stack.sup.children[r].poll() is None for r in ("ingest", "worker")):
                break
            time.sleep(0.1)
        assert stack.sup.status()["ingest"]["restarts"] == 1
        assert stack.sup.status()["worker"]["restarts"] == 1
        assert stack.sup.status()["ingest"]["last_exit_code"] == -signal.SIGKILL
        assert states["ingest"] == "running"

        # The restarted roles count the next events (a canary with a click).
        stack.publish("impressions", "after", imp("after", "c1", "a", campaign="k"))
        stack.publish("clicks", "after", click("after"))
        stack.flush()
        stack.wait_for(lambda: stack.counts("k", "a").get("c1") == (2, 1), 120, "canary count")
        status_file = stack.settings.data_dir / "supervisor.json"
        assert '"restarts": 1' in status_file.read_text()
    finally:
        stack.stop()

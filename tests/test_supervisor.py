"""The supervisor restarts a dead role with backoff and shows a crash loop.

The restart policy is pure (every method takes the time); one integration test kills a
real role on the embedded broker and checks that the stack carries on.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

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


def test_several_processes_of_a_role_get_their_own_instance_port_and_state(
    tmp_path: Path,
) -> None:
    from adloop.streams.supervisor import ROLES, Supervisor, instances, split_instance

    assert instances(ROLES, 1) == ROLES
    assert instances(("ingest", "serve"), 2) == ("ingest-1", "ingest-2", "serve-1", "serve-2")
    assert split_instance("ingest-2") == ("ingest", 2) and split_instance("worker") == ("worker", 0)
    with pytest.raises(ValueError):
        split_instance("ingest-0")
    settings = Settings(data_dir=tmp_path, api_port=9100, metrics_port_base=9200)
    sup = Supervisor(settings, roles=instances(ROLES, 2))
    env = {name: sup._env(name) for name in sup.roles}
    assert [env[f"serve-{n}"]["ADLOOP_API_PORT"] for n in (1, 2)] == ["9100", "9101"]
    assert sup.serving() == ["serve-1", "serve-2"] and sup.api_port("serve-2") == 9101
    assert env["ingest-1"]["ADLOOP_INSTANCE"] == "1" and env["worker-2"]["ADLOOP_INSTANCE"] == "2"
    ports = {env[n]["ADLOOP_METRICS_PORT"] for n in sup.roles if not n.startswith("serve")}
    assert len(ports) == 4  # one /metrics port per process
    child = Settings(data_dir=tmp_path, instance=env["ingest-2"]["ADLOOP_INSTANCE"])
    assert child.state_dir("ingest") == tmp_path / "ingest-2"
    assert Settings(data_dir=tmp_path).state_dir("ingest") == tmp_path / "ingest"

"""Runs adloop's roles (ingest, worker, serve; loop, generator) as supervised child processes.

Children get the parent's Settings through ``ADLOOP_*`` variables, log to
``<data_dir>/logs/<role>.log``, and are killed by the kernel if the parent dies
(PR_SET_PDEATHSIG), so no process outlives ``adloop up`` / ``adloop demo``.

A role can run as several processes (``ingest-1``, ``ingest-2``, ...: ``instances``):
each gets ``ADLOOP_INSTANCE``, hence its own state directories (``Settings.state_dir``),
and serving instance n listens on ``api_port + n - 1`` (the worker's web port and the
metrics ports move the same way). Ingest and worker instances share their role's
consumer group, so they share its partitions, and a dead one's partitions move to the
others with their state (the ingest's changelog, the worker's Faust table changelog).

A role that dies is restarted with exponential backoff (``RestartPolicy``, pure and
clock-injected); one that keeps dying is in a visible *crash loop* (a log line at
error level, ``status()``, and ``<data_dir>/supervisor.json``) and is still retried
at the longest backoff. The stack never exits because one role did: every role's
state is exact across restarts (see the README's "Exactness across crashes").
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from adloop.streams.broker import _die_with_parent_preexec
from adloop.streams.config import Settings

log = logging.getLogger("adloop.supervisor")

ROLES = ("ingest", "worker", "serve")
# The closed loop: the controller and the generator (which loads the models).
LOOP_ROLES = ("loop", "generator")
ALL_ROLES = ROLES + LOOP_ROLES


def split_instance(name: str) -> tuple[str, int]:
    """``"ingest-2"`` -> ``("ingest", 2)``; a plain role is instance 0 (the only one)."""
    role, _, number = name.rpartition("-")
    if role in ALL_ROLES and number.isdigit() and int(number) >= 1:
        return role, int(number)
    if name in ALL_ROLES:
        return name, 0
    raise ValueError(f"unknown role {name!r}: one of {ALL_ROLES}, optionally with -<n>, n >= 1")


def instances(roles: tuple[str, ...], count: int) -> tuple[str, ...]:
    """Each role ``count`` times (``ingest-1``, ``ingest-2``, ...); once is the role itself."""
    if count <= 1:
        return roles
    return tuple(f"{role}-{n}" for role in roles for n in range(1, count + 1))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADLOOP_")}
    for name, value in settings.model_dump(exclude_none=True).items():
        key = f"ADLOOP_{name.upper()}"
        env[key] = json.dumps(value) if isinstance(value, dict) else str(value)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class ChildDied(RuntimeError):
    pass


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead role is started again."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A role that ran this long since its last start is healthy again: backoff resets.
    stable_after_s: float = 60.0
    # This many exits within the window is a crash loop (still retried, at max delay).
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 300.0


@dataclass
class RoleHealth:
    """One role's restart bookkeeping. Pure: every method takes the time."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    started_at: float | None = None
    exits: deque[float] = field(default_factory=deque)
    consecutive_failures: int = 0
    restarts: int = 0
    last_exit_code: int | None = None
    next_start_at: float | None = None

    def on_started(self, now: float) -> None:
        self.started_at = now
        self.next_start_at = None

    def on_exit(self, now: float, code: int) -> float:
        """Record an exit; returns the delay before the next start."""
        if self.started_at is not None and now - self.started_at >= self.policy.stable_after_s:
            self.consecutive_failures = 0
        self.consecutive_failures += 1
        self.last_exit_code = code
        self.started_at = None
        self.exits.append(now)
        while self.exits and now - self.exits[0] > self.policy.crash_loop_window_s:
            self.exits.popleft()
        delay = min(
            self.policy.max_delay_s,
            self.policy.first_delay_s * 2 ** (self.consecutive_failures - 1),
        )
        if self.crash_loop(now):
            delay = self.policy.max_delay_s
        self.next_start_at = now + delay
        return delay

    def crash_loop(self, now: float) -> bool:
        recent = [t for t in self.exits if now - t <= self.policy.crash_loop_window_s]
        return len(recent) >= self.policy.crash_loop_exits

    def due(self, now: float) -> bool:
        return self.next_start_at is not None and now >= self.next_start_at

    def state(self, now: float) -> str:
        if self.next_start_at is not None:
            return "crash_loop" if self.crash_loop(now) else "restarting"
        return "running" if self.started_at is not None else "stopped"


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        roles: tuple[str, ...] = ROLES,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.roles = roles
        self.log_dir = settings.data_dir / "logs"
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.policy = policy or RestartPolicy()
        self.health: dict[str, RoleHealth] = {}
        self.admin_token: str | None = None
        self._secure()

    def _secure(self) -> None:
        """The local stack's admin token and audit key, made on first start (0600 files
        in the data dir); a configured audit key is kept."""
        from adloop.streams.auth import TokenStore, ensure_admin_token, ensure_secret_file

        if self.settings.audit_key is None:
            key = ensure_secret_file(self.settings.data_dir / "audit-key")
            self.settings = self.settings.with_overrides(audit_key=key)
        self.admin_token, created = ensure_admin_token(
            TokenStore(self.settings.tokens_path), self.settings.admin_token_path
        )
        if created:
            log.info(
                "created the local admin token",
                extra={"path": str(self.settings.admin_token_path), "mode": "0600"},
            )

    def log_path(self, role: str) -> Path:
        return self.log_dir / f"{role}.log"

    def api_port(self, name: str = "serve") -> int:
        """The serving API port of ``serve`` or ``serve-<n>``."""
        _, number = split_instance(name)
        return self.settings.api_port + max(0, number - 1)

    def serving(self) -> list[str]:
        return [name for name in self.roles if split_instance(name)[0] == "serve"]

    def _env(self, name: str) -> dict[str, str]:
        env = settings_env(self.settings)
        role, number = split_instance(name)
        offset = max(0, number - 1)
        if number:
            env["ADLOOP_INSTANCE"] = str(number)
            env["ADLOOP_API_PORT"] = str(self.api_port(name))
            if self.settings.worker_web_port:
                env["ADLOOP_WORKER_WEB_PORT"] = str(self.settings.worker_web_port + offset)
        if self.settings.metrics_port_base and role != "serve":
            # Each role its own /metrics port (serving has /metrics on its API port).
            index = ALL_ROLES.index(role) + len(ALL_ROLES) * offset
            env["ADLOOP_METRICS_PORT"] = str(self.settings.metrics_port_base + 1 + index)
        return env

    def start(self, role: str | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in (role,) if role else self.roles:
            env = self._env(name)
            out = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "adloop", split_instance(name)[0]],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent_preexec(),
            )
            out.close()
            self.health.setdefault(name, RoleHealth(self.policy)).on_started(time.monotonic())
            log.info("started", extra={"role": name, "pid": self.children[name].pid})

    def supervise(self) -> dict[str, str]:
        """Restart dead roles with backoff; call it every fraction of a second.

        Returns each role's state (running, restarting, crash_loop). Unlike
        ``check()``, a dead role never stops the others.
        """
        now = time.monotonic()
        changed = False
        for name, child in list(self.children.items()):
            health = self.health.setdefault(name, RoleHealth(self.policy))
            code = child.poll()
            if code is not None and health.next_start_at is None:
                delay = health.on_exit(now, code)
                changed = True
                crash_loop = health.crash_loop(now)
                (log.error if crash_loop else log.warning)(
                    "role exited; restarting" + (" (crash loop)" if crash_loop else ""),
                    extra={
                        "role": name,
                        "exit_code": code,
                        "restart_in_s": round(delay, 2),
                        "restarts": health.restarts,
                        "state": health.state(now),
                        "log": str(self.log_path(name)),
                        "log_tail": self.tail(name, lines=5),
                    },
                )
            if health.due(now):
                health.restarts += 1
                self.start(name)
                changed = True
        states = {name: h.state(now) for name, h in self.health.items()}
        if changed:
            self._write_status(now)
        return states

    def status(self) -> dict[str, dict[str, object]]:
        """Per role: state, restarts, last exit code, pid."""
        now = time.monotonic()
        return {
            name: {
                "state": h.state(now),
                "restarts": h.restarts,
                "last_exit_code": h.last_exit_code,
                "pid": self.children[name].pid if name in self.children else None,
            }
            for name, h in self.health.items()
        }

    def _write_status(self, now: float) -> None:
        try:
            path = self.settings.data_dir / "supervisor.json"
            path.write_text(json.dumps({"at": time.time(), "roles": self.status()}, indent=2))
        except OSError as exc:  # status is informative; never stop supervising for it
            log.warning("cannot write supervisor status", extra={"error": str(exc)})

    def check(self) -> None:
        """Raise if a child exited, with the end of its log."""
        for name, child in self.children.items():
            code = child.poll()
            if code is not None:
                tail = self.tail(name)
                raise ChildDied(
                    f"adloop {name} exited with code {code}; end of {self.log_path(name)}:\n{tail}"
                )

    def tail(self, role: str, lines: int = 25) -> str:
        try:
            text = self.log_path(role).read_text(errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        child = self.children[role]
        child.send_signal(sig)
        child.wait(timeout=30)

    def wait_http_ready(self, timeout: float = 60.0) -> None:
        """Until every serving instance answers /healthz."""
        deadline = time.monotonic() + timeout
        for name in self.serving() or ["serve"]:
            url = f"http://{self.settings.api_host}:{self.api_port(name)}/healthz"
            while True:
                self.check()
                try:
                    with urllib.request.urlopen(url, timeout=1) as response:
                        if response.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"serving API not ready at {url} after {timeout:.0f} s:\n{self.tail(name)}"
                    )
                time.sleep(0.2)

    def stop(self, timeout: float = 15.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, child in self.children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("did not stop in time; killing", extra={"role": name})
                child.kill()
                child.wait()
        self.children.clear()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

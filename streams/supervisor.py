"""Runs adloop's roles (ingest, worker, serve; loop, generator) as supervised child processes.

Children get the parent's Settings through ``ADLOOP_*`` variables, log to
``<data_dir>/logs/<role>.log``, and are killed by the kernel if the parent dies
(PR_SET_PDEATHSIG), so no process outlives ``adloop up`` / ``adloop demo``.
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
from pathlib import Path

from adloop.streams.broker import _die_with_parent_preexec
from adloop.streams.config import Settings

log = logging.getLogger("adloop.supervisor")

ROLES = ("ingest", "worker", "serve")
# The closed loop: the controller and the generator (which loads the models).
LOOP_ROLES = ("loop", "generator")


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


class Supervisor:
    def __init__(self, settings: Settings, roles: tuple[str, ...] = ROLES) -> None:
        self.settings = settings
        self.roles = roles
        self.log_dir = settings.data_dir / "logs"
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, role: str) -> Path:
        return self.log_dir / f"{role}.log"

    def start(self, role: str | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = settings_env(self.settings)
        for name in (role,) if role else self.roles:
            out = open(self.log_path(name), "ab")  # noqa: SIM115 - owned by the child
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "adloop", name],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent_preexec(),
            )
            out.close()
            log.info("started", extra={"role": name, "pid": self.children[name].pid})

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
        url = f"http://{self.settings.api_host}:{self.settings.api_port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(
            f"serving API not ready at {url} after {timeout:.0f} s:\n{self.tail('serve')}"
        )

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

"""The README's main job, as a user runs it: `adloop demo` on the embedded broker."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from adloop.bench.harness import free_port

pytestmark = pytest.mark.integration


def _demo(tmp_path: Path) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "adloop",
            "demo",
            "--events",
            "1500",
            "--rate",
            "500",
            "--no-live",
            "--api-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.mark.timeout(1500)
def test_demo_runs_end_to_end_and_counts_exactly(tmp_path: Path) -> None:
    output = _demo(tmp_path)
    assert "1,500 / " in output and "exact" in output
    assert "adloop demo summary" in output
    # Again in the same folder: the new embedded broker starts empty, so the local
    # state of the first run must not be reused.
    again = _demo(tmp_path)
    assert "cleared state of an earlier embedded run" in again
    assert "exact" in again

    # Nothing left behind: no broker, no adloop role still running from this run
    # (a process the kernel is still taking down may be listed for a moment).
    def leftovers() -> list[psutil.Process]:
        return [
            p
            for p in psutil.process_iter(["cmdline", "status"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])
            and p.info["status"] != psutil.STATUS_ZOMBIE
        ]

    deadline = time.monotonic() + 120
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers() == []

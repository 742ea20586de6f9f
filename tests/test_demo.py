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


def _demo(tmp_path: Path, *extra: str, timeout: float = 600) -> str:
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
            *extra,
            "--api-port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    return output


@pytest.mark.timeout(1500)
def test_demo_runs_end_to_end_and_counts_exactly(tmp_path: Path) -> None:
    output = _demo(tmp_path, "--loop-cycles", "0")
    assert "1,500 / " in output and "exact" in output
    assert "adloop demo summary" in output
    # Again in the same folder: the new embedded broker starts empty, so the local
    # state of the first run must not be reused.
    again = _demo(tmp_path, "--no-loop")
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


@pytest.mark.timeout(1500)
def test_demo_shows_a_full_loop_cycle(tmp_path: Path) -> None:
    """The closed loop as the demo's user sees it: it keeps sending past --events until a
    verdict led to a request whose variants went live, were served and replaced the
    underperformer (the demo logs "loop cycle complete" when it sees that in the API)."""
    output = _demo(tmp_path, "--max-events", "400000", timeout=1400)
    assert "loop cycle complete" in output, output[-4000:]
    assert "exact" in output
    cycle = next(line for line in output.splitlines() if "loop cycle complete" in line)
    assert 'headlines=["' in cycle and "retired=" in cycle, cycle
    # The summary: the cycle counted, the generated variants' traffic and CTR.
    assert "full loop cycles" in output and "generated variants' traffic" in output
    assert "✓" in output and "retired" in output

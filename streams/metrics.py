"""Every Prometheus metric adloop exposes, in one place, and how each role serves them.

Each role serves ``/metrics`` (``prometheus-client``): the serving API on its own HTTP
port, the other roles on ``ADLOOP_METRICS_PORT`` (0 = off; ``adloop up`` gives each
role its own port from ``ADLOOP_METRICS_PORT_BASE``). The Grafana dashboard in
``deploy/grafana/`` is built from ``DASHBOARD`` below, so a panel can only name a
metric that is declared here (``tests/test_ops.py`` also scrapes the running stack
for each of them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("adloop.metrics")

# Latency buckets in seconds: 1 ms .. 60 s (click -> decision is ~tens of ms; a
# generation request takes seconds).
_LATENCY = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip

# --- ingest -------------------------------------------------------------------------
EVENTS = Counter("adloop_events_total", "Exchange events counted by the ingest, by kind.", ["kind"])
DEAD_LETTERS = Counter(
    "adloop_dead_letters_total", "Events refused with a dead letter, by reason code.", ["reason"]
)
INGEST_LAG = Gauge(
    "adloop_ingest_lag_events",
    "Events in the broker that the ingest has not applied yet, by input topic role.",
    ["topic"],
)
STATE_ENTRIES = Gauge(
    "adloop_state_entries",
    "Entries held in memory by a role's bounded state, by store.",
    ["role", "store"],
)
# --- worker and serving ---------------------------------------------------------------
DECISIONS = Counter("adloop_decisions_total", "Decisions published by the worker.")
EVENT_TO_DECISION = Histogram(
    "adloop_event_to_decision_seconds",
    "From the newest event a decision counts to the moment this role applied it "
    "(serving: visible over HTTP; the click -> decision latency).",
    ["role"],
    buckets=_LATENCY,
)
DECISION_AGE = Gauge(
    "adloop_decision_age_seconds",
    "Seconds since the newest decision this serving process received.",
)
SELECT_SECONDS = Histogram(
    "adloop_select_seconds", "Time to answer POST /v1/select in the server.", buckets=_LATENCY
)
FOLLOWER_ERRORS = Counter(
    "adloop_follower_errors_total",
    "Records a topic follower could not decode and skipped, by topic role and reason.",
    ["topic", "reason"],
)
READY = Gauge("adloop_ready", "1 when the role's followers are caught up and it serves.", ["role"])
# --- the loop and the generator -------------------------------------------------------
GENERATION_SECONDS = Histogram(
    "adloop_generation_seconds",
    "Seconds from a generation request's arrival to its answer, in the generator.",
    buckets=_LATENCY,
)
GENERATED_VARIANTS = Counter(
    "adloop_generated_variants_total",
    "Variants the generator wrote, by outcome (passed or rejected).",
    ["outcome"],
)
GENERATION_REQUESTS = Counter(
    "adloop_generation_requests_total", "Generation requests the loop published."
)


def serve_metrics(host: str, port: int, role: str) -> None:
    """Start the /metrics endpoint of a role that has no HTTP server of its own."""
    if port <= 0:
        return
    start_http_server(port, addr=host)
    log.info("metrics endpoint", extra={"role": role, "host": host, "port": port})


@dataclass(frozen=True)
class Panel:
    title: str
    expr: str  # PromQL
    unit: str  # Grafana unit id
    metric: str  # the metric family it needs (checked against a live scrape)
    legend: str = ""


#: The Grafana dashboard's panels, top to bottom.
DASHBOARD: tuple[Panel, ...] = (
    Panel(
        "Events counted per second",
        "sum by (kind) (rate(adloop_events_total[1m]))",
        "ops",
        "adloop_events_total",
        "{{kind}}",
    ),
    Panel(
        "Dead letters per second by reason",
        "sum by (reason) (rate(adloop_dead_letters_total[1m]))",
        "ops",
        "adloop_dead_letters_total",
        "{{reason}}",
    ),
    Panel(
        "Ingest lag (events not yet applied)",
        "sum by (topic) (adloop_ingest_lag_events)",
        "short",
        "adloop_ingest_lag_events",
        "{{topic}}",
    ),
    Panel(
        "Decision age (serving)",
        "max(adloop_decision_age_seconds)",
        "s",
        "adloop_decision_age_seconds",
    ),
    Panel(
        "Click -> decision visible over HTTP, p99",
        "histogram_quantile(0.99, sum by (le) "
        '(rate(adloop_event_to_decision_seconds_bucket{role="serve"}[5m])))',
        "s",
        "adloop_event_to_decision_seconds",
        "p99",
    ),
    Panel(
        "Select latency in the server, p99",
        "histogram_quantile(0.99, sum by (le) (rate(adloop_select_seconds_bucket[5m])))",
        "s",
        "adloop_select_seconds",
        "p99",
    ),
    Panel(
        "Generation latency, p95",
        "histogram_quantile(0.95, sum by (le) (rate(adloop_generation_seconds_bucket[15m])))",
        "s",
        "adloop_generation_seconds",
        "p95",
    ),
    Panel(
        "Generated variants passing the filters",
        'sum(rate(adloop_generated_variants_total{outcome="passed"}[15m])) / '
        "sum(rate(adloop_generated_variants_total[15m]))",
        "percentunit",
        "adloop_generated_variants_total",
        "pass rate",
    ),
    Panel(
        "Follower decode errors",
        "sum by (topic, reason) (rate(adloop_follower_errors_total[5m]))",
        "ops",
        "adloop_follower_errors_total",
        "{{topic}} {{reason}}",
    ),
    Panel(
        "State held in memory",
        "sum by (role, store) (adloop_state_entries)",
        "short",
        "adloop_state_entries",
        "{{role}} {{store}}",
    ),
)

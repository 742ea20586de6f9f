"""Versioned wire records: events from the exchange, creatives, decisions, dead letters."""

from schemas.records import (
    SCHEMA_VERSION,
    Click,
    Conversion,
    Creative,
    CreativeCounts,
    DeadLetter,
    Decision,
    Impression,
    OutcomeSnapshot,
    RankedCreative,
    decision_key,
    split_decision_key,
)
from schemas.validation import InvalidRecord, RecordDecoder

__all__ = [
    "SCHEMA_VERSION",
    "Click",
    "Conversion",
    "Creative",
    "CreativeCounts",
    "DeadLetter",
    "Decision",
    "Impression",
    "InvalidRecord",
    "OutcomeSnapshot",
    "RankedCreative",
    "RecordDecoder",
    "decision_key",
    "split_decision_key",
]

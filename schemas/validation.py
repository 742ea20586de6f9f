"""Decode untrusted bytes into records, turning every failure into a reason code.

Reason codes are stable strings used on the dead-letter topic and in metrics;
the human-readable reason says what was wrong and where.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class InvalidRecord(ValueError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


def classify(exc: msgspec.MsgspecError) -> str:
    message = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return "malformed_json"
    if "$.schema_version" in message:
        return "unsupported_schema_version"
    if "missing required field" in message:
        return "missing_field"
    if "got `" in message:
        return "wrong_type"
    return "invalid_value"


class RecordDecoder(Generic[T]):
    """A reusable, fast decoder for one record type with a payload size limit."""

    def __init__(self, record_type: type[T], max_bytes: int) -> None:
        self.record_type = record_type
        self.max_bytes = max_bytes
        self._decoder = msgspec.json.Decoder(record_type)

    def decode(self, payload: bytes | None) -> T:
        if payload is None:
            raise InvalidRecord("empty_payload", "message has no value (tombstone or null)")
        if len(payload) > self.max_bytes:
            raise InvalidRecord(
                "oversized_payload",
                f"{len(payload)} bytes exceeds the {self.max_bytes}-byte limit "
                "(ADLOOP_MAX_PAYLOAD_BYTES)",
            )
        try:
            return self._decoder.decode(payload)
        except msgspec.MsgspecError as exc:
            name = self.record_type.__name__
            raise InvalidRecord(classify(exc), f"{name}: {exc}") from None

"""Personal data: what adloop keeps of an event, and in what form (pure).

adloop needs no personal data to count clicks or choose a creative. What an exchange
sends beyond the counted fields is treated this way, before anything is stored,
logged, dead-lettered or published:

* **Context keys pass an allow-list** (``ADLOOP_CONTEXT_KEYS``; default: device,
  hour, weekday, placement_type, country, region, os, browser, language, and the
  Open Bandit Dataset's ``user_feature_*`` / ``affinity_*`` columns). Others are dropped.
* **Fields an operator marks personal** (``ADLOOP_PERSONAL_FIELDS``, e.g.
  ``user_id,email,ip``), whether at the top of an event or inside its context, are
  replaced by a keyed hash: ``h<key id>:<HMAC-SHA256, 16 bytes, hex>``. The key
  rotates (``ADLOOP_PRIVACY_KEYS`` = JSON ``{"<id>": "<secret>"}``, the highest id
  signs); a hash says which key made it, so joins across a rotation are possible
  only for whoever holds both keys.
* **Dead letters** keep what is needed to diagnose: the reason, the source
  coordinates and the payload with the above applied (``redact_payload``) — never
  the raw bytes of a personal field.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONTEXT_KEYS: tuple[str, ...] = (
    "device",
    "hour",
    "weekday",
    "placement_type",
    "country",
    "region",
    "os",
    "browser",
    "language",
    "user_feature_*",
    "affinity_*",
)

#: Audience ids and context values that flow into keys, logs and prompts: a safe
#: printable alphabet (no whitespace, no control or bidirectional characters).
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,127}$")


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    parts = [re.escape(p).replace(r"\*", ".*") for p in patterns]
    return re.compile("^(?:" + "|".join(parts) + ")$") if parts else re.compile(r"(?!x)x")


@dataclass(frozen=True)
class PrivacyPolicy:
    """The allow-list, the personal fields and the hashing keys."""

    context_keys: tuple[str, ...] = DEFAULT_CONTEXT_KEYS
    personal_fields: frozenset[str] = frozenset()
    # key id -> secret; the highest id signs new hashes.
    keys: Mapping[str, bytes] = field(default_factory=dict)
    _allowed: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", _compile(self.context_keys))
        if self.personal_fields and not self.keys:
            raise ValueError(
                "ADLOOP_PERSONAL_FIELDS is set but no ADLOOP_PRIVACY_KEYS: personal fields "
                'are hashed with a secret key; set ADLOOP_PRIVACY_KEYS=\'{"1": "<secret>"}\''
            )

    @property
    def key_id(self) -> str:
        return max(self.keys, key=lambda k: (len(k), k))

    def pseudonym(self, value: object) -> str:
        """A keyed hash of ``value``: stable under one key, useless without it."""
        kid = self.key_id
        mac = hmac.new(self.keys[kid], str(value).encode(), hashlib.sha256).hexdigest()
        return f"h{kid}:{mac[:32]}"

    def allows_context_key(self, key: str) -> bool:
        return bool(self._allowed.match(key))

    def clean_context(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """The context as adloop may keep it: allowed keys, personal values hashed."""
        out: dict[str, Any] = {}
        for key, value in context.items():
            if key in self.personal_fields:
                out[key] = self.pseudonym(value)
            elif self.allows_context_key(key):
                out[key] = value
        return out

    def clean_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """An event object as a dict: personal fields hashed, context cleaned."""
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key in self.personal_fields:
                out[key] = self.pseudonym(value)
            elif key == "context" and isinstance(value, Mapping):
                out[key] = self.clean_context(value)
            else:
                out[key] = value
        return out

    def redact_payload(self, payload: bytes | None, limit: int = 4096) -> bytes:
        """What a dead letter keeps of a refused payload.

        A JSON object is cleaned field by field; anything else (not JSON, a list, a
        number) cannot be told apart from personal data, so only its size and a
        keyed digest remain when personal fields are configured, else its first
        ``limit`` bytes.
        """
        if payload is None:
            return b""
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            obj = None
        if isinstance(obj, dict):
            cleaned = self.clean_object(obj)
            return json.dumps(cleaned, separators=(",", ":"), allow_nan=True).encode()[:limit]
        if self.personal_fields:
            return json.dumps(
                {"unparsed_bytes": len(payload), "digest": self.pseudonym(payload.hex())}
            ).encode()
        return payload[:limit]


def parse_keys(raw: str | Mapping[str, str] | None) -> dict[str, bytes]:
    """``ADLOOP_PRIVACY_KEYS``: a JSON object of key id -> secret."""
    if not raw:
        return {}
    data = json.loads(raw) if isinstance(raw, str) else dict(raw)
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) >= 16 for k, v in data.items()
    ):
        raise ValueError(
            'ADLOOP_PRIVACY_KEYS must be a JSON object {"<key id>": "<secret of 16+ chars>"}'
        )
    return {k: v.encode() for k, v in data.items()}


def is_safe_token(value: str) -> bool:
    """Audience ids and similar: letters, digits and _ . : @ - (no spaces, no controls)."""
    return bool(SAFE_TOKEN.match(value))

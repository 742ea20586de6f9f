"""The creative registry: every process's view of the compacted creatives topic.

``CreativeRegistry`` is plain in-memory state (testable without Kafka);
``RegistryFollower`` keeps one up to date by reading every partition of the
creatives topic from the beginning (no consumer group: each process needs all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.follower import TopicFollower

log = logging.getLogger("adloop.registry")


@dataclass
class CreativeRegistry:
    creatives: dict[str, Creative] = field(default_factory=dict)
    by_campaign: dict[str, dict[str, Creative]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so caches know when to refresh

    def put(self, creative: Creative) -> None:
        old = self.creatives.get(creative.creative_id)
        if old is not None and old.campaign != creative.campaign:
            self.by_campaign.get(old.campaign, {}).pop(creative.creative_id, None)
        self.creatives[creative.creative_id] = creative
        self.by_campaign.setdefault(creative.campaign, {})[creative.creative_id] = creative
        self.version += 1

    def get(self, creative_id: str) -> Creative | None:
        return self.creatives.get(creative_id)

    def has_campaign(self, campaign: str) -> bool:
        return bool(self.by_campaign.get(campaign))

    def campaign_creatives(self, campaign: str) -> list[Creative]:
        return list(self.by_campaign.get(campaign, {}).values())

    def servable(self, campaign: str, audience: str) -> list[Creative]:
        """Active creatives of a campaign that target the audience, in a stable order."""
        return sorted(
            (
                c
                for c in self.by_campaign.get(campaign, {}).values()
                if c.status == "active" and c.targets(audience)
            ),
            key=lambda c: c.creative_id,
        )


class RegistryFollower(TopicFollower):
    """Applies every creatives-topic record to a registry."""

    def __init__(
        self,
        settings: Settings,
        registry: CreativeRegistry,
        on_change: Callable[[Creative], None] | None = None,
    ) -> None:
        # Creatives change rarely: poll gently; sync() catches up on demand.
        super().__init__(settings, "creatives", max(settings.fetch_wait_ms, 100))
        self.registry = registry
        self.on_change = on_change
        self._decoder = msgspec.json.Decoder(Creative)

    def apply(self, record: Any) -> None:
        if record.value is None:
            return
        try:
            creative = self._decoder.decode(record.value)
        except msgspec.MsgspecError as exc:
            # Creatives are written by adloop itself (validated at the API), so a bad
            # record here is a bug or a foreign writer; skip it loudly.
            log.warning("skipping invalid creative record: %s", exc)
            return
        self.registry.put(creative)
        if self.on_change is not None:
            self.on_change(creative)

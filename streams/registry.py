"""The creative registry: every process's view of the compacted creatives topic.

``CreativeRegistry`` is plain in-memory state (testable without Kafka);
:func:`registry_follower` keeps one up to date by following every partition of the
creatives topic (no consumer group: each process needs all).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adloop.schemas import Creative
from adloop.streams.config import Settings
from adloop.streams.follower import Follower


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


def registry_follower(
    settings: Settings,
    registry: CreativeRegistry,
    on_change: Callable[[Creative], None] | None = None,
) -> Follower[Creative]:
    """A follower that applies every creatives-topic record to ``registry``."""

    def apply(creative: Creative) -> None:
        registry.put(creative)
        if on_change is not None:
            on_change(creative)

    # Creatives change rarely: poll gently; sync() catches up on demand.
    return Follower(
        settings, "creatives", apply, fetch_max_wait_ms=max(settings.fetch_wait_ms, 100)
    )

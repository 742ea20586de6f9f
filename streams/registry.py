"""The creative registry: every process's view of the compacted creatives topic.

``CreativeRegistry`` is plain in-memory state (testable without Kafka);
:func:`registry_follower` keeps one up to date by following every partition of the
creatives topic (no consumer group: each process needs all).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from adloop.schemas import Creative
from adloop.schemas.versioning import accept
from adloop.streams.config import Settings
from adloop.streams.follower import Follower


@dataclass
class CreativeRegistry:
    creatives: dict[str, Creative] = field(default_factory=dict)
    by_campaign: dict[str, dict[str, Creative]] = field(default_factory=dict)
    version: int = 0  # bumped on every change, so caches know when to refresh
    # Records not applied, by reason (schemas.versioning.accept): stale, lost races,
    # ids claimed by another campaign.
    ignored: Counter[str] = field(default_factory=Counter)

    def put(self, creative: Creative) -> bool:
        """Apply a record if it wins (see schemas/versioning.py); False when ignored."""
        old = self.creatives.get(creative.creative_id)
        why = accept(old, creative)
        if why is not None:
            self.ignored[why] += 1
            return False
        self.creatives[creative.creative_id] = creative
        self.by_campaign.setdefault(creative.campaign, {})[creative.creative_id] = creative
        self.version += 1
        return True

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
        if registry.put(creative) and on_change is not None:
            on_change(creative)

    # Creatives change rarely: poll gently; sync() catches up on demand.
    return Follower(
        settings, "creatives", apply, fetch_max_wait_ms=max(settings.fetch_wait_ms, 100)
    )

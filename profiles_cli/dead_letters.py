"""`profiles dead-letters`: what the bus gave up on, and putting it back once the cause is fixed.

A consumer dead-letters a message it cannot decode (`unknown_kind`, `undecodable_data`,
`malformed_entry`) or whose handler kept failing (`handler_failed` on its last delivery,
`max_deliveries` when its consumers crashed while handling it); an outage of the database or of
Redis spends no delivery (shared.bus). A dead letter waits in its topic's dead-letter stream
until an operator replays it: after a fix of the handler, or an upgrade that knows the kind."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the bus loads Redis and structlog: not for every `profiles` command's parser
    from shared.bus import Bus, DeadLetter

# Replayed unless others are asked for: the handler failures. A message that could not be
# decoded fails again the same way until the code that reads it changes.
HANDLER_REASONS = ("handler_failed", "max_deliveries")


@dataclass(frozen=True, slots=True)
class TopicSummary:
    topic: str
    count: int
    by_reason: dict[str, int]  # "reason" or "reason (group)" -> letters


async def summaries(bus: Bus) -> list[TopicSummary]:
    """Every topic's dead letters, counted by reason and consumer group."""
    from shared.topics import TOPICS

    out = []
    for topic in TOPICS:
        letters = await bus.dead_letters(topic)
        counts = Counter(_reason_of(letter) for letter in letters)
        out.append(TopicSummary(topic, len(letters), dict(sorted(counts.items()))))
    return out


def _reason_of(letter: DeadLetter) -> str:
    return f"{letter.reason} ({letter.group})" if letter.group else letter.reason


def chosen(
    letters: Iterable[DeadLetter], reasons: Sequence[str], group: str, limit: int
) -> list[DeadLetter]:
    """The letters to replay: of `reasons`, of `group` when given, the oldest `limit`."""
    picked = [
        letter
        for letter in letters
        if letter.reason in reasons and (not group or letter.group == group)
    ]
    return picked[:limit]


async def replay(
    bus: Bus, topic: str, reasons: Sequence[str], group: str, limit: int
) -> list[tuple[DeadLetter, str]]:
    """Replays the chosen letters of `topic`, oldest first; returns each with its new entry ID."""
    letters = chosen(await bus.dead_letters(topic), reasons, group, limit)
    return [(letter, await bus.replay_dead_letter(letter)) for letter in letters]

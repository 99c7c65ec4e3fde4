"""Batching and coalescing decisions: which decoded events go into which
write batch, and which of them still matter. Pure and I/O-free.

Why coalesce: `UPDATE … FROM unnest(…)` with one id twice updates the row from
either of them, unpredictably, and OSAC-style re-publishing makes most traffic
duplicates. So each batch keeps only the newest event per instance (by the
contract's ordering key) while still carrying every message's ack token.

Why shards: parallel writers that touch disjoint instances never wait on each
other's row locks and never deadlock, so an instance always lands in the same
shard (one shard per writer).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Generic, TypeVar

from dcmstatus.core.model import Decision, Rejection, StatusUpdate

Token = TypeVar("Token")


class WriteBatch(Generic[Token]):
    """One transaction's worth of work for one writer."""

    __slots__ = ("rejections", "shard", "superseded", "tokens", "updates")

    def __init__(
        self,
        shard: int,
        updates: list[StatusUpdate],
        rejections: list[Rejection],
        tokens: list[Token],
        superseded: int,
    ) -> None:
        self.shard = shard
        self.updates = updates  # newest per instance, sorted by instance id
        self.rejections = rejections
        self.tokens = tokens  # one per message in the batch: all are acked after commit
        self.superseded = superseded  # events dropped because a newer one for the same instance was in the batch

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def of_rejections(cls, shard: int, rejections: list[Rejection]) -> WriteBatch[Token]:
        return cls(shard, [], rejections, [], 0)

    def halves(self) -> tuple[WriteBatch[Token], WriteBatch[Token]]:
        """Two batches holding this one's events, to isolate one the store refuses.
        Tokens stay with the caller: a message is acked when its whole batch is resolved."""
        events: list[StatusUpdate | Rejection] = [*self.updates, *self.rejections]
        middle = len(events) // 2
        parts = []
        for part, superseded in ((events[:middle], self.superseded), (events[middle:], 0)):
            updates = [e for e in part if type(e) is StatusUpdate]
            rejections = [e for e in part if type(e) is not StatusUpdate]
            parts.append(WriteBatch(self.shard, updates, rejections, [], superseded))  # type: ignore[arg-type]
        return parts[0], parts[1]

    def rejection_counts(self) -> Counter[str]:
        return Counter(r.reason for r in self.rejections)

    def __repr__(self) -> str:
        return (
            f"WriteBatch(shard={self.shard}, messages={len(self.tokens)}, "
            f"updates={len(self.updates)}, rejections={len(self.rejections)})"
        )


class _Shard:
    __slots__ = ("newest", "rejections", "superseded", "tokens")

    def __init__(self) -> None:
        self.newest: dict[tuple[str, str], StatusUpdate] = {}
        self.rejections: list[Rejection] = []
        self.tokens: list[Any] = []
        self.superseded = 0


class BatchBuilder(Generic[Token]):
    """Collects decisions until the caller hands a shard, or all, to the writers."""

    def __init__(self, shards: int = 1) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self._shard_count = shards
        self._shards = [_Shard() for _ in range(shards)]
        self._messages = 0

    def __len__(self) -> int:
        """Messages collected since the last take()."""
        return self._messages

    def add(self, decision: Decision, token: Token) -> None:
        self._messages += 1
        if type(decision) is StatusUpdate:
            shard = self._shards[hash(decision.instance_id) % self._shard_count]
            shard.tokens.append(token)
            key = (decision.instance_id, decision.service_type)
            current = shard.newest.get(key)
            if current is None:
                shard.newest[key] = decision
            else:
                shard.superseded += 1
                if decision.order_key() > current.order_key():
                    shard.newest[key] = decision
        else:
            # Rejections carry no row lock: any shard can record them.
            shard = self._shards[0]
            shard.tokens.append(token)
            shard.rejections.append(decision)  # type: ignore[arg-type]

    def pending(self, shard: int) -> int:
        """Messages collected for one shard."""
        return len(self._shards[shard].tokens)

    def take_shard(self, index: int) -> WriteBatch[Token]:
        """One shard's batch; resets that shard."""
        shard = self._shards[index]
        # Sorted ids: one deterministic row-lock order inside a statement.
        updates = sorted(shard.newest.values(), key=_instance_id)
        self._shards[index] = _Shard()
        self._messages -= len(shard.tokens)
        return WriteBatch(index, updates, shard.rejections, shard.tokens, shard.superseded)

    def take(self) -> list[WriteBatch[Token]]:
        """The non-empty batches collected so far, one per shard; resets the builder."""
        return [self.take_shard(i) for i in range(self._shard_count) if self._shards[i].tokens]


def _instance_id(update: StatusUpdate) -> str:
    return update.instance_id

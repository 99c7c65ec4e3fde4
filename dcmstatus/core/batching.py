"""Batching and coalescing decisions: which decoded events go into which
write batch, and which of them still matter. Pure and I/O-free.

Why coalesce: `UPDATE … FROM unnest(…)` with one id twice updates the row from
either of them, unpredictably, and OSAC-style re-publishing makes most traffic
duplicates. So each batch keeps only the newest event per instance (by the
contract's ordering key) while still carrying every message's ack token. The
events it supersedes stay with the batch, unwritten: should the database
refuse the newest one (poison), the newest of those is applied instead of
being acked without effect (docs/reliability.md).

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

    __slots__ = ("older", "rejections", "shard", "superseded", "tokens", "updates")

    def __init__(
        self,
        shard: int,
        updates: list[StatusUpdate],
        rejections: list[Rejection],
        tokens: list[Token],
        superseded: int,
        older: dict[tuple[str, str], list[StatusUpdate]] | None = None,
    ) -> None:
        self.shard = shard
        self.updates = updates  # newest per instance, sorted by instance id
        self.rejections = rejections
        self.tokens = tokens  # one per message in the batch: all are acked after commit
        self.superseded = superseded  # events dropped because a newer one for the same instance was in the batch
        # Those dropped events, by (instance id, service type) of the update
        # that superseded them: the fall-back should that update be refused.
        self.older = older if older is not None else {}

    def fallback(self, refused: StatusUpdate) -> WriteBatch[Token] | None:
        """The batch to apply instead of `refused` (an update of this batch the
        store will never take): the newest event it superseded, still carrying
        the older ones, or None when it superseded nothing."""
        older = sorted(self.older.get(_key(refused), ()), key=StatusUpdate.order_key, reverse=True)
        if not older:
            return None
        newest, rest = older[0], older[1:]
        return WriteBatch(self.shard, [newest], [], [], len(rest), {_key(newest): rest} if rest else None)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def of_rejections(cls, shard: int, rejections: list[Rejection]) -> WriteBatch[Token]:
        return cls(shard, [], rejections, [], 0)

    def halves(self) -> tuple[WriteBatch[Token], WriteBatch[Token]]:
        """Two batches holding this one's events, to isolate one the store refuses.
        Tokens stay with the caller: a message is acked when its whole batch is resolved.
        Superseded events go with the update that superseded them, so each
        half counts exactly its own."""
        events: list[StatusUpdate | Rejection] = [*self.updates, *self.rejections]
        middle = len(events) // 2
        parts: list[WriteBatch[Token]] = []
        for part in (events[:middle], events[middle:]):
            updates = [e for e in part if isinstance(e, StatusUpdate)]
            rejections = [e for e in part if isinstance(e, Rejection)]
            older = {_key(u): self.older[_key(u)] for u in updates if _key(u) in self.older}
            superseded = sum(map(len, older.values()))
            parts.append(WriteBatch(self.shard, updates, rejections, [], superseded, older))
        return parts[0], parts[1]

    def rejection_counts(self) -> Counter[str]:
        return Counter(r.reason for r in self.rejections)

    def __repr__(self) -> str:
        return (
            f"WriteBatch(shard={self.shard}, messages={len(self.tokens)}, "
            f"updates={len(self.updates)}, rejections={len(self.rejections)})"
        )


class _Shard:
    __slots__ = ("newest", "older", "rejections", "superseded", "tokens")

    def __init__(self) -> None:
        self.newest: dict[tuple[str, str], StatusUpdate] = {}
        self.older: dict[tuple[str, str], list[StatusUpdate]] = {}
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
                # Only duplicates and re-publishes get here: the common path
                # above stays one dict lookup.
                shard.superseded += 1
                if decision.order_key() > current.order_key():
                    shard.newest[key] = decision
                    decision = current
                older = shard.older.get(key)
                if older is None:
                    shard.older[key] = [decision]
                else:
                    older.append(decision)
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
        return WriteBatch(index, updates, shard.rejections, shard.tokens, shard.superseded, shard.older)

    def take(self) -> list[WriteBatch[Token]]:
        """The non-empty batches collected so far, one per shard; resets the builder."""
        return [self.take_shard(i) for i in range(self._shard_count) if self._shards[i].tokens]


def _instance_id(update: StatusUpdate) -> str:
    return update.instance_id


def _key(update: StatusUpdate) -> tuple[str, str]:
    return (update.instance_id, update.service_type)

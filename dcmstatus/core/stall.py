"""Whether intake is stalled: the one decision behind the consumer's `stalled`
health state and its subscription reset (docs/reliability.md). Fed plain
numbers and timestamps, so it is tested without a server or a clock.

Intake is stalled when work is waiting and nothing moves: the server reports
messages not yet delivered to the consumer, or messages we received still wait
for their ack, and for `timeout` seconds no message was received and none was
acknowledged. An idle stream is never stalled, however long it stays quiet.

Which side is stuck decides what helps. Messages held in flight and not acked
mean the writes are stuck (a database that hangs or fails): re-subscribing
cannot help, so the verdict only reports it. Nothing held while the server has
a backlog means the deliveries are missing (a lost subscription, pull requests
the server no longer serves): then a reset is due, and again after every
further `timeout` without progress.
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    PROGRESSING = "progressing"  # moving, or nothing to wait for
    STALLED = "stalled"  # work waits and nothing moved for the timeout
    RESET = "reset"  # stalled with nothing in flight: subscribe and pull afresh now


class StallWatch:
    def __init__(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("the stall timeout must be positive")
        self.timeout = timeout
        self.verdict = Verdict.PROGRESSING
        self._moved = 0
        self._backlog = 0
        self._since: float | None = None  # since when work waits with nothing moving

    @property
    def stalled(self) -> bool:
        return self.verdict is not Verdict.PROGRESSING

    def saw_backlog(self, pending: int) -> None:
        """The server's count of messages not yet delivered to the consumer."""
        self._backlog = pending

    def hold(self) -> None:
        """Nothing can move now (the connection is down): the wait starts again
        once it is back, so a reconnect is not taken for a stall."""
        self._since = None

    def observe(self, now: float, *, moved: int, in_flight: int) -> Verdict:
        """`moved` only grows, with every message received or acknowledged;
        `in_flight` counts those received and not yet acknowledged."""
        if moved != self._moved:
            self._moved = moved
            # A count taken before this progress may be gone already; the next
            # one tells (so a backlog just worked off is not taken for a stall).
            self._backlog = 0
            self._since = None
            self.verdict = Verdict.PROGRESSING
        if in_flight <= 0 and self._backlog <= 0:
            self._since = None
            self.verdict = Verdict.PROGRESSING
            return self.verdict
        if self._since is None:
            self._since = now
        if now - self._since < self.timeout:
            if self.verdict is Verdict.RESET:
                self.verdict = Verdict.STALLED  # reset issued; still stalled until something moves
            return self.verdict
        if in_flight > 0:
            self.verdict = Verdict.STALLED
        else:
            self.verdict = Verdict.RESET
            self._since = now  # the next reset only after another whole timeout
        return self.verdict

"""The one start-up policy for what the service depends on (PostgreSQL, NATS):
try; while a try fails, log one line saying what is awaited and when the next
try is, and retry with capped exponential back-off; give up with the reason
once the start-up deadline (`--startup-timeout`, 0 = never) has passed
(docs/operations.md#start-up).

Meanwhile `Startup.awaiting` names what start-up waits for (the kind, not
the address: /health answers without a token), so /health can say it. Errors that say the configuration is wrong (`ConfigError`) are never
retried: waiting cannot fix them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from dcmstatus.core.errors import ConfigError, StartupTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")


class Startup:
    """The start-up deadline and the dependencies awaited before it."""

    def __init__(self, timeout: float, *, first_delay: float = 0.5, max_delay: float = 5.0) -> None:
        self.timeout = timeout  # seconds; 0 waits forever
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._deadline: float | None = None
        self._awaiting: list[str] = []

    def begin(self) -> None:
        """Start the clock (else the first dependency awaited starts it)."""
        self._deadline = trio.current_time() + self.timeout if self.timeout > 0 else math.inf

    @property
    def awaiting(self) -> str | None:
        """What start-up is waiting for now, e.g. "PostgreSQL", or None."""
        return ", ".join(self._awaiting) or None

    def dependency(self, name: str, at: str = "") -> Dependency:
        """The tries of dependency `name` (at address `at`, for the log), for
        a caller that runs its own loop."""
        if self._deadline is None:
            self.begin()
        return Dependency(self, name, at)

    async def reach(
        self,
        name: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        at: str = "",
        unreachable: tuple[type[BaseException], ...] = (Exception,),
    ) -> T:
        """`await attempt()` until it succeeds; retry the errors in `unreachable`."""
        tries = self.dependency(name, at)
        while True:
            try:
                result = await attempt()
            except ConfigError:
                tries.forget()
                raise
            except unreachable as exc:
                await tries.failed(exc)
            else:
                tries.reached()
                return result


class Dependency:
    """One awaited dependency: logs each failed try, waits, or gives up."""

    def __init__(self, startup: Startup, name: str, at: str = "") -> None:
        self._startup = startup
        self.name = name
        self.what = f"{name} at {at}" if at else name
        self.tries = 0
        self._delay = startup.first_delay
        startup._awaiting.append(name)

    async def failed(self, exc: BaseException) -> None:
        """After a failed try: wait for the next one, or raise StartupTimeout."""
        self.tries += 1
        startup = self._startup
        reason = _one_line(exc)
        assert startup._deadline is not None
        remaining = startup._deadline - trio.current_time()
        if remaining <= 0:
            self.forget()
            raise StartupTimeout(
                f"{self.what} was still unreachable after --startup-timeout {startup.timeout:g}s "
                f"({self.tries} tries; last: {reason}); make it reachable, or wait longer with "
                f"--startup-timeout (0 waits forever)"
            ) from None
        wait = min(self._delay, remaining)
        give_up = "" if math.isinf(remaining) else f", giving up in {remaining:.0f}s"
        log.warning(
            "waiting for %s: try %d failed (%s); next try in %.1fs%s", self.what, self.tries, reason, wait, give_up
        )
        await trio.sleep(wait)
        self._delay = min(self._delay * 2, startup.max_delay)

    def reached(self) -> None:
        if self.tries:
            log.info("%s is reachable after %d failed tries", self.what, self.tries)
        self.forget()

    def forget(self) -> None:
        """No longer awaited."""
        if self.name in self._startup._awaiting:
            self._startup._awaiting.remove(self.name)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

"""The start-up policy (engine/startup.py) on trio's MockClock: retry with
capped back-off, one log line per failed try, give up at the deadline with
the reason, never retry a configuration error, 0 waits forever."""

from __future__ import annotations

import itertools
import logging

import pytest
import trio
import trio.testing

from dcmstatus.core.errors import ConfigError, StartupTimeout
from dcmstatus.engine.startup import Startup


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def failing(times: list[float], failures: int, error: Exception | None = None):
    async def attempt():
        times.append(trio.current_time())
        if len(times) <= failures:
            raise error or ConnectionRefusedError("nobody listens")
        return "up"

    return attempt


async def test_retries_with_capped_backoff_and_says_what_it_awaits(autojump_clock, caplog):
    caplog.set_level(logging.INFO, "dcmstatus.engine.startup")
    startup = Startup(120)
    startup.begin()
    times: list[float] = []
    seen: list[str | None] = []

    async def attempt():
        seen.append(startup.awaiting)
        return await failing(times, 6)()

    assert await startup.reach("PostgreSQL", attempt, at="pg:5432") == "up"
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert set(seen) == {"PostgreSQL"}  # health names the kind, the log the address
    assert startup.awaiting is None
    waits = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(waits) == 6, waits
    assert waits[0].startswith(
        "waiting for PostgreSQL at pg:5432: try 1 failed (ConnectionRefusedError: nobody listens)"
    )
    assert "next try in 0.5s, giving up in 120s" in waits[0]
    assert any("reachable after 6 failed tries" in r.getMessage() for r in caplog.records)


async def test_gives_up_at_the_deadline_with_the_reason(autojump_clock):
    startup = Startup(10)
    startup.begin()
    times: list[float] = []
    with pytest.raises(StartupTimeout) as raised:
        await startup.reach("NATS", failing(times, 10**6), at="nats://n:4222")
    assert times[-1] == pytest.approx(10.0), "the last try is at the deadline, not before nor long after"
    assert trio.current_time() == pytest.approx(10.0)
    message = str(raised.value)
    assert "NATS at nats://n:4222" in message and "--startup-timeout 10s" in message
    assert "ConnectionRefusedError: nobody listens" in message
    assert startup.awaiting is None


async def test_zero_waits_forever(autojump_clock):
    startup = Startup(0)
    startup.begin()
    times: list[float] = []
    assert await startup.reach("NATS", failing(times, 500)) == "up"
    assert times[-1] > 2000  # far past any default deadline


async def test_a_configuration_error_is_never_retried(autojump_clock):
    startup = Startup(0)
    times: list[float] = []
    with pytest.raises(ConfigError):
        await startup.reach("NATS", failing(times, 10, ConfigError("bad URL")))
    assert len(times) == 1
    assert startup.awaiting is None


async def test_only_the_errors_that_mean_unreachable_are_retried(autojump_clock):
    startup = Startup(0)
    times: list[float] = []
    with pytest.raises(KeyError):
        await startup.reach("PostgreSQL", failing(times, 10, KeyError("a bug")), unreachable=(OSError,))
    assert len(times) == 1

"""The stall decision (dcmstatus.core.stall) on plain timestamps and counters."""

from __future__ import annotations

import pytest

from dcmstatus.core.stall import StallWatch, Verdict

P, S, R = Verdict.PROGRESSING, Verdict.STALLED, Verdict.RESET


def test_an_idle_stream_is_never_stalled():
    watch = StallWatch(30)
    for now in range(0, 3600, 5):
        watch.saw_backlog(0)
        assert watch.observe(now, moved=0, in_flight=0) is P
    assert not watch.stalled


def test_a_backlog_nothing_delivers_is_reset_and_reset_again_each_timeout():
    watch = StallWatch(30)
    watch.saw_backlog(500)
    verdicts = {now: watch.observe(now, moved=0, in_flight=0) for now in range(0, 91)}
    assert {now for now, v in verdicts.items() if v is R} == {30, 60, 90}
    assert all(v is S for now, v in verdicts.items() if 30 < now < 90 and now != 60)
    assert all(v is P for now, v in verdicts.items() if now < 30)


def test_progress_ends_the_stall_at_once():
    watch = StallWatch(30)
    watch.saw_backlog(500)
    assert watch.observe(0, moved=0, in_flight=0) is P
    assert watch.observe(30, moved=0, in_flight=0) is R
    assert watch.stalled
    assert watch.observe(31, moved=1, in_flight=1) is P  # a message arrived
    assert not watch.stalled


def test_messages_held_without_acks_are_a_stall_but_no_reset():
    # The writes are stuck (database down or hanging): re-subscribing cannot help.
    watch = StallWatch(30)
    verdicts = [watch.observe(now, moved=2000, in_flight=1000) for now in range(0, 121)]
    assert verdicts[29] is P and verdicts[30] is S and R not in verdicts
    assert watch.observe(122, moved=2100, in_flight=900) is P  # a batch committed and was acked


def test_a_backlog_counted_before_the_last_progress_is_not_believed():
    # The count said 100 waiting, then we took and acked them: until a newer
    # count confirms a backlog, nothing is waiting.
    watch = StallWatch(3)
    watch.saw_backlog(100)
    watch.observe(0, moved=0, in_flight=0)
    watch.observe(1, moved=200, in_flight=0)
    assert [watch.observe(now, moved=200, in_flight=0) for now in range(2, 60)] == [P] * 58
    watch.saw_backlog(5)  # a fresh count: now it waits
    assert watch.observe(60, moved=200, in_flight=0) is P
    assert watch.observe(63, moved=200, in_flight=0) is R


def test_the_wait_starts_when_work_appears_not_at_the_last_progress():
    watch = StallWatch(30)
    watch.observe(0, moved=7, in_flight=0)
    watch.observe(1000, moved=7, in_flight=0)  # quiet for a long time
    watch.saw_backlog(10)  # just published; about to be delivered
    assert watch.observe(1001, moved=7, in_flight=0) is P
    assert watch.observe(1030, moved=7, in_flight=0) is P
    assert watch.observe(1031, moved=7, in_flight=0) is R


def test_a_disconnection_holds_the_clock():
    watch = StallWatch(30)
    watch.saw_backlog(10)
    watch.observe(0, moved=0, in_flight=0)
    watch.hold()  # disconnected from 25 to 40
    assert watch.observe(40, moved=0, in_flight=0) is P
    assert watch.observe(69, moved=0, in_flight=0) is P
    assert watch.observe(70, moved=0, in_flight=0) is R


def test_the_timeout_must_be_positive():
    with pytest.raises(ValueError):
        StallWatch(0)

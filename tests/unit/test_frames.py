"""Frames at the byte level, as nats-py's protocol parser hands them to the
source's frame hook: whatever the subject, reply and header bytes, the hook
never raises into nats-py, and every frame ends as a delivery (marked
unreadable when it cannot be read), a pull status, or a counted drop.

Also the start-up check of nats-py's internals (adapters/nats/internals.py)
against the installed nats-py, and what the source does when it fails.
"""

from __future__ import annotations

import itertools
import json
import logging
from types import SimpleNamespace

import nats.aio.client
import nats.aio.subscription
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcmstatus.adapters.nats import internals
from dcmstatus.adapters.nats.frames import MAX_HEADERS, ack_position, read_frame, read_headers
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import INVALID_ENVELOPE, REJECTION_REASONS, Rejection, StatusUpdate
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import _unreadable

SID = 7
ACK = b"$JS.ACK.dcm-status.dcmstatus.1.42.42.1700000000000000000.0"
DOMAIN_ACK = b"$JS.ACK.hub.ACCHASH.dcm-status.dcmstatus.1.43.43.1700000000000000001.0.token"
EVENT = json.dumps({"specversion": "1.0", "id": "e", "source": "s", "type": "t",
                    "data": {"id": "vm-1", "status": "RUNNING"}}).encode()  # fmt: skip
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeNC:
    """Just enough of nats-py's Client for the frame hook: the private
    methods the start-up check looks at, and publish() for pulls and acks."""

    def __init__(self) -> None:
        self.is_connected, self.is_closed = True, False
        self.max_payload = 1024 * 1024
        self.sub = SimpleNamespace(_id=SID)
        self._subs = {SID: self.sub}
        self.passed_on: list[tuple] = []  # frames of other subscriptions
        self.pulls = 0
        self.raw_acks: list[bytes] = []

    async def _process_msg(self, sid, subject, reply, data, headers):
        self.passed_on.append((sid, subject))
        subject.decode()  # what nats-py's _build_message does: raises on such bytes

    async def _send_command(self, cmd, priority=False):
        self.raw_acks.append(cmd)

    async def _flush_pending(self, force_flush=False):
        pass

    async def publish(self, subject, payload=b"", reply="", headers=None):
        self.pulls += 1


def hooked_source(fast_path: bool = True) -> tuple[JetStreamSource, FakeNC, trio.MemoryReceiveChannel]:
    source = JetStreamSource(NatsSettings(url="nats://fake", fast_path=fast_path), Metrics())
    nc = FakeNC()
    source._nc, source._sub = nc, nc.sub
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    source._install_fast_path()
    return source, nc, receive


def dropped(source: JetStreamSource) -> float:
    return source._metrics.registry.get_sample_value("dcmstatus_frames_dropped_total")


def drain(receive: trio.MemoryReceiveChannel) -> list:
    out = []
    while True:
        try:
            out.append(receive.receive_nowait())
        except trio.WouldBlock:
            return out


# ------------------------------------------------------------ header blocks


def test_server_status_blocks_are_read():
    block = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 4\r\nNats-Pending-Bytes: 0\r\n\r\n"
    assert read_headers(block) == ("408", "Request Timeout", {"Nats-Pending-Messages": "4", "Nats-Pending-Bytes": "0"})
    assert read_headers(b"NATS/1.0 404 No Messages\r\n\r\n") == ("404", "No Messages", {})
    assert read_headers(b"NATS/1.0 409\r\n\r\n") == ("409", "", {})


def test_binary_mode_headers_are_read():
    block = b"NATS/1.0\r\nce-specversion: 1.0\r\nce-id:x\r\nce-source: \xc3\xa9 \r\nce-id: last\r\n\r\n"
    assert read_headers(block) == (None, "", {"ce-specversion": "1.0", "ce-id": "last", "ce-source": "é"})
    assert read_headers(b"NATS/1.0\r\n\r\n") == (None, "", {})


@pytest.mark.parametrize(
    ("block", "says"),
    [
        (b"NATS/1.0", "does not start with a NATS/1.0 line"),
        (b"GARBAGE\r\n\r\n", "does not start with a NATS/1.0 line"),
        (b"NATS/1.1\r\n\r\n", "does not start with a NATS/1.0 line"),
        (b"NATS/1.0X\r\n\r\n", "not NATS/1.0 with a status"),
        (b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", "not NATS/1.0 with a status"),
        (b"NATS/1.0\r\na: b\r\n", "does not end with an empty line"),
        (b"NATS/1.0\r\nno colon\r\n\r\n", "has no ':'"),
        (b"NATS/1.0\r\n: empty name\r\n\r\n", "no valid name"),
        (b"NATS/1.0\r\nsp ace: x\r\n\r\n", "no valid name"),
        (b"NATS/1.0\r\nn\xc3\xa9: x\r\n\r\n", "no valid name"),
        (b"NATS/1.0\r\nce-id: \xff\r\n\r\n", "is not UTF-8"),
        (b"NATS/1.0\r\n" + b"a:\r\n" * 16_000 + b"\r\n", "more than 256 headers"),
        (b"NATS/1.0\r\n" + b"a\r\n" * 20_000 + b"\r\n", "more than 256 headers"),
        (b"NATS/1.0\r\na: " + b"x" * 70_000 + b"\r\n\r\n", "more than 65536"),
    ],
)
def test_broken_header_blocks_say_what_is_wrong(block, says):
    with pytest.raises(ValueError, match=says):
        read_headers(block)


def test_the_header_bound_is_inclusive():
    block = b"NATS/1.0\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n"
    assert len(read_headers(block)[2]) == MAX_HEADERS
    with pytest.raises(ValueError):
        read_headers(block[:-2] + b"one: more\r\n\r\n")


# ------------------------------------------------------------------- frames


def test_ack_subjects_of_both_forms():
    assert ack_position(ACK.decode()) == (42, 1700000000000000000)
    assert ack_position(DOMAIN_ACK.decode()) == (43, 1700000000000000001)
    for odd in ("$JS.ACK", "$JS.ACK.a.b", "$JS.ACK.s.c.1.x.1.1.0", "$JS.NAK.s.c.1.1.1.1.0", "x.ACK.s.c.1.1.1.1.0"):
        with pytest.raises(ValueError):
            ack_position(odd)


@pytest.mark.parametrize(
    ("subject", "reply", "block", "ack", "problem"),
    [
        (b"dcm.vm\xff", ACK, None, ACK.decode(), "subject is not UTF-8"),
        (b"dcm.vm", b"$JS.ACK.s.c.9", None, "$JS.ACK.s.c.9", "not a JetStream ack subject of a known form"),
        (b"dcm.vm", ACK, b"NATS/1.0", ACK.decode(), "broken header block"),
        (b"dcm.vm\xff", ACK, b"NATS/1.0", ACK.decode(), "subject is not UTF-8 (stored with \\x escapes); broken"),
        (b"dcm.vm", b"", None, None, "has no reply subject"),
        (b"dcm.vm", b"_INBOX.x", None, None, "is not a JetStream ack subject"),
        (b"dcm.vm", b"$JS.ACK.\xff.c.1.1.1.1.0", None, None, "is not UTF-8"),
        (b"dcm.vm", b"", b"NATS/1.0 4o8 x\r\n\r\n", None, "broken header block"),
    ],
)
def test_frames_that_cannot_be_read(subject, reply, block, ack, problem):
    frame = read_frame(subject, reply, block)
    assert frame.ack == ack and problem in frame.problem and frame.status is None
    assert frame.subject == subject.decode("utf-8", "backslashreplace")


def test_a_status_needs_no_reply_and_a_reply_makes_a_message():
    status = read_frame(b"_INBOX.x", b"", b"NATS/1.0 408 Request Timeout\r\n\r\n")
    assert (status.status, status.description, status.ack, status.problem) == ("408", "Request Timeout", None, None)
    # Published with an inline status: a stream message all the same (its
    # status is no pull status).
    message = read_frame(b"dcm.vm", ACK, b"NATS/1.0 408\r\nce-id: 1\r\n\r\n")
    assert (message.status, message.ack, message.headers, message.problem) == (None, ACK.decode(), {"ce-id": "1"}, None)
    assert (message.stream_seq, message.stream_time_ns) == (42, 1700000000000000000)


# ------------------------------------------------------------ the frame hook


async def test_the_hook_takes_every_kind_of_frame_and_raises_nothing():
    source, nc, receive = hooked_source()
    assert source.fast_path and source._send_acks is internals.send_acks
    hook = nc._process_msg
    frames = [
        (b"dcm.vm", ACK, EVENT, None),  # the common frame
        (b"dcm.vm\xff", ACK, EVENT, None),
        (b"dcm.vm", b"$JS.ACK.s.c.9", EVENT, None),
        (b"dcm.vm", ACK, EVENT, b"NATS/1.0"),
        (b"dcm.vm", ACK, EVENT, b"GARBAGE\r\n\r\n"),
        (b"dcm.vm", ACK, EVENT, b"NATS/1.0\r\n" + b"a:\r\n" * 20_000 + b"\r\n"),
        (b"dcm.vm", DOMAIN_ACK, b"{}", b"NATS/1.0\r\nce-specversion: 1.0\r\n\r\n"),  # binary mode, fine
        (b"dcm.vm", b"", EVENT, None),  # no reply: dropped
        (b"dcm.vm", b"\xff\xfe", EVENT, b"\x00"),  # dropped
        (b"_INBOX.x", b"", b"", b"NATS/1.0 408 Request Timeout\r\n\r\n"),  # a pull status
    ]
    for subject, reply, data, block in frames:
        await hook(SID, subject, reply, data, block)
    got = drain(receive)
    assert [d.unreadable is None for d in got] == [True, False, False, False, False, False, True]
    assert [d.stream_seq for d in got] == [42, 42, 0, 42, 42, 42, 43]
    assert got[1].subject == "dcm.vm\\xff" and got[6].headers == {"ce-specversion": "1.0"}
    assert dropped(source) == 2
    # Another subscription's frame goes on to nats-py; one nats-py cannot read
    # is counted and dropped instead of raising into its reader.
    await hook(SID + 1, b"_INBOX.api", b"", b"{}", None)
    await hook(SID + 1, b"_INBOX.\xff", b"", b"{}", None)
    assert [s for _, s in nc.passed_on] == [b"_INBOX.api", b"_INBOX.\xff"] and dropped(source) == 3


async def test_the_hook_survives_a_failing_handler(monkeypatch):
    source, nc, _ = hooked_source()

    def broken(frame, data):
        raise RuntimeError("a bug")

    monkeypatch.setattr(source, "_take", broken)
    await nc._process_msg(SID, b"dcm.vm", ACK, EVENT, b"NATS/1.0\r\n\r\n")  # must not raise
    assert dropped(source) == 1


async def test_unreadable_deliveries_become_invalid_envelope_rejections():
    _, nc, receive = hooked_source()
    await nc._process_msg(SID, b"dcm.vm\xff", ACK, b"x" * 10_000, None)
    [delivery] = drain(receive)
    rejection = _unreadable(delivery)
    assert rejection.reason == INVALID_ENVELOPE and rejection.subject == "dcm.vm\\xff"
    assert rejection.stream_seq == 42 and len(rejection.body) == 4096 and "not UTF-8" in rejection.detail


async def test_acks_go_out_raw_on_the_fast_path_and_through_publish_otherwise():
    source, nc, _ = hooked_source()
    await source._ack_and_refill([ACK.decode()])
    assert nc.raw_acks == [b"PUB " + ACK + b" 4\r\n+ACK\r\n"]
    slow, slow_nc, _ = hooked_source(fast_path=False)
    pulls = slow_nc.pulls
    await slow._ack_and_refill([ACK.decode()])
    assert slow_nc.raw_acks == [] and slow_nc.pulls > pulls  # publish(reply, b"+ACK"), then pulls


# -------------------------------------------------------- the start-up check


def test_the_installed_nats_py_passes_the_check():
    """Fails when a nats-py upgrade changes what internals.py relies on."""
    nc = nats.aio.client.Client()
    sub = nats.aio.subscription.Subscription(nc, id=3, subject="_INBOX.x")
    nc._subs[3] = sub
    assert internals.fast_path_problem(nc, sub) is None


def test_changed_internals_fall_back_to_the_public_api(caplog):
    class Changed(FakeNC):
        async def _process_msg(self, sid, subject, reply, data, headers, extra=None):
            pass

    source = JetStreamSource(NatsSettings(url="nats://fake"), Metrics())
    nc = Changed()
    source._nc, source._sub = nc, nc.sub
    with caplog.at_level(logging.WARNING):
        source._install_fast_path()
    assert not source.fast_path and nc._process_msg.__func__ is Changed._process_msg
    [record] = [r for r in caplog.records if "internals" in r.getMessage()]
    assert "_process_msg takes (sid, subject, reply, data, headers, extra)" in record.getMessage()
    nc.sub._id = "not an int"
    assert "not registered" in internals.fast_path_problem(FakeNC(), nc.sub)


# ------------------------------------------------------------- frame fuzzing

subjects = st.one_of(
    st.binary(min_size=1, max_size=24).map(lambda b: b"dcm." + b),
    st.sampled_from([b"dcm.vm", b"dcm.cluster", b"dcm.vm\xff", b"dcm.\xc3\x28", b"_INBOX.x"]),
    st.binary(min_size=1, max_size=40),
)
acks = st.builds(
    lambda seq, ts, domain: (b"$JS.ACK.hub.HASH.s.c.1.%d.1.%d.0.t" if domain else b"$JS.ACK.s.c.1.%d.1.%d.0") % (seq, ts),
    st.integers(0, 2**63), st.integers(0, 2**63), st.booleans(),
)  # fmt: skip
replies = st.one_of(
    acks,
    st.just(b""),
    st.binary(max_size=60),
    st.lists(st.binary(max_size=6), max_size=14).map(lambda ts: b"$JS.ACK." + b".".join(ts)),
)
header_lines = st.one_of(
    st.tuples(st.sampled_from([b"ce-specversion", b"ce-id", b"Status", b"a"]), st.binary(max_size=12)).map(
        lambda kv: kv[0] + b": " + kv[1]
    ),
    st.binary(max_size=20),
)
header_blocks = st.one_of(
    st.none(),
    st.lists(header_lines, max_size=6).map(lambda ls: b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in ls) + b"\r\n"),
    st.binary(min_size=1, max_size=80).map(lambda b: b"NATS/1.0" + b),
    st.binary(min_size=1, max_size=80),
    st.integers(MAX_HEADERS - 2, MAX_HEADERS + 2).map(lambda n: b"NATS/1.0\r\n" + b"a: 1\r\n" * n + b"\r\n"),
    st.sampled_from([b"NATS/1.0 408 Request Timeout\r\n\r\n", b"NATS/1.0 409 Consumer Deleted\r\n\r\n"]),
)
bodies = st.one_of(st.binary(max_size=100), st.just(EVENT))
DECODER = Decoder(Catalog.default())


@SETTINGS
@given(st.lists(st.tuples(subjects, replies, bodies, header_blocks), min_size=1, max_size=20))
def test_any_frame_ends_as_a_delivery_a_status_or_a_counted_drop(frames):
    async def run():
        source, nc, receive = hooked_source()
        statuses = []
        on_status = source._on_status
        source._on_status = lambda headers: (statuses.append(headers["Status"]), on_status(headers))
        for subject, reply, data, block in frames:
            await nc._process_msg(SID, subject, reply, data, block)  # never raises
        got = drain(receive)
        assert len(got) + len(statuses) + dropped(source) == len(frames)
        for d in got:
            assert d.token.startswith("$JS.ACK.")
            if d.unreadable is None:
                decision = DECODER.decode(d.subject, d.headers, d.body, d.stream_seq, d.stream_time_ns)
            else:
                decision = _unreadable(d)
                assert decision.reason == INVALID_ENVELOPE
            assert isinstance(decision, (StatusUpdate, Rejection))
            if isinstance(decision, Rejection):
                assert decision.reason in REJECTION_REASONS

    trio.run(run)


@SETTINGS
@given(subjects, replies)
def test_the_inline_path_and_the_careful_reader_agree(subject, reply):
    """A header-less frame the inline path takes, the careful reader finds
    nothing wrong with, at the same position; one it does not take, the
    careful reader marks or drops."""
    import dcmstatus.adapters.nats.source as source_module

    careful = []

    def read_frame_spy(*args):
        careful.append(args)
        return read_frame(*args)

    async def run():
        source, _, receive = hooked_source()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(source_module, "read_frame", read_frame_spy)
            source._on_frame(subject, reply, b"", None)
        got = drain(receive)
        frame = read_frame(subject, reply, None)
        if not careful:  # taken inline
            [inline] = got
            assert frame.problem is None and inline.unreadable is None
            assert (inline.subject, inline.token, inline.stream_seq, inline.stream_time_ns) == (
                frame.subject, frame.ack, frame.stream_seq, frame.stream_time_ns,
            )
        else:
            assert frame.problem is not None

    trio.run(run)


async def test_dropped_frames_are_logged_rate_limited_and_summarised_at_close(caplog):
    source, nc, _ = hooked_source()
    with caplog.at_level(logging.WARNING):
        for _ in range(50):
            await nc._process_msg(SID, b"_INBOX.x", b"", b"", None)
        nc.is_closed = True
        await source.close()
    lines = [r.getMessage() for r in caplog.records]
    assert dropped(source) == 50
    assert sum("dropped a frame" in line for line in lines) == 5
    assert any("suppressed 45 event lines" in line and "dropped_frame=45" in line for line in lines), lines


async def test_the_widened_parser_splits_msg_lines_as_the_server_does(monkeypatch):
    """nats-server splits on space and tab only and stores a subject with a
    vertical tab; nats-py's pattern (any whitespace) failed on it and reset
    the connection, on every redelivery."""
    import re

    import nats.protocol.parser as parser

    monkeypatch.setattr(parser, "MSG_RE", parser.MSG_RE)  # undone after the test
    monkeypatch.setattr(parser, "HMSG_RE", parser.HMSG_RE)
    assert internals.widen_protocol_parser() is None
    assert internals.widen_protocol_parser() is None, "not idempotent"
    seen = []

    class Client:
        async def _process_msg(self, sid, subject, reply, data, headers):
            seen.append((sid, subject, reply, data, headers))

    p = parser.Parser(Client())
    await p.parse(b"MSG dcm.a\x0bb 7 " + ACK + b" 2\r\nok\r\nHMSG dcm.\x0c 7 _R 12 14\r\nNATS/1.0\r\n\r\nok\r\n")
    assert seen == [(7, b"dcm.a\x0bb", ACK, b"ok", None), (7, b"dcm.\x0c", b"_R", b"ok", b"NATS/1.0\r\n\r\n")]
    monkeypatch.setattr(parser, "MSG_RE", re.compile(rb"\AMSG (other)"))
    assert "MSG_RE is not the pattern expected" in internals.widen_protocol_parser()


# ------------------------------------------------------------ the frame parser


class ParsingNC(FakeNC):
    """FakeNC with nats-py's real protocol parser in front of it."""

    def __init__(self) -> None:
        import nats.protocol.parser

        super().__init__()
        self._ps = nats.protocol.parser.Parser(self)
        self.pings = 0

    async def _process_ping(self):
        self.pings += 1

    async def _process_pong(self):
        pass


def parsing_source(frame_parser: bool) -> tuple[JetStreamSource, ParsingNC, trio.MemoryReceiveChannel]:
    source = JetStreamSource(NatsSettings(url="nats://fake"), Metrics())
    nc = ParsingNC()
    source._nc, source._sub = nc, nc.sub
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    source._install_fast_path()
    if not frame_parser:
        internals.remove_frame_hook(nc)
        internals.install_frame_hook(nc, nc.sub, source._on_frame, source._refill, source._on_hook_error)
    assert source.fast_path and ("parse" in vars(nc._ps)) == frame_parser
    return source, nc, receive


def wire(subject: bytes, sid: int, reply: bytes, data: bytes, headers: bytes | None) -> bytes:
    if headers is None:
        line = b"MSG %s %d %s%d\r\n" % (subject, sid, reply + b" " if reply else b"", len(data))
        return line + data + b"\r\n"
    line = b"HMSG %s %d %s%d %d\r\n" % (subject, sid, reply + b" " if reply else b"", len(headers), len(headers) + len(data))
    return line + headers + data + b"\r\n"


def test_the_frame_parser_passes_its_self_test_on_the_installed_nats_py():
    """Fails when a nats-py upgrade changes the parser internals.py reads around."""
    assert internals.frame_parser_problem(nats.aio.client.Client()) is None
    assert internals.frame_parser_problem(FakeNC()) == "Client._ps is not a nats.protocol.parser.Parser"


async def test_the_frame_parser_reads_our_frames_itself_and_passes_on_the_rest():
    _source, nc, receive = parsing_source(frame_parser=True)
    ours = [wire(b"dcm.vm", SID, ACK, EVENT, None) for _ in range(50)]
    stream = b"".join(ours[:20]) + b"PING\r\n" + wire(b"_INBOX.other", SID + 1, b"", b"x", None) + b"".join(ours[20:])
    await nc._ps.parse(stream[:1000])
    await nc._ps.parse(stream[1000:])
    got = drain(receive)
    assert len(got) == 50 and {d.token for d in got} == {ACK.decode()} and got[0].body == EVENT
    assert nc.pings == 1 and nc.passed_on == [(SID + 1, b"_INBOX.other")]
    # Read in one loop, the frames never went through nats-py's per-frame path:
    # only those after the PING did (nats-py's parser read the rest of that chunk).
    calls = []
    nc._process_msg, hook = (lambda *a: calls.append(a) or hook(*a)), nc._process_msg  # type: ignore[method-assign]
    await nc._ps.parse(b"".join(ours))
    assert len(drain(receive)) == 50 and calls == []


frames_on_the_wire = st.lists(
    st.tuples(
        st.one_of(subjects.filter(lambda s: not any(c in s for c in b" \t\r\n")), st.just(b"dcm.vm")),
        st.sampled_from([SID, SID, SID, SID + 1, 70]),
        st.one_of(acks, st.just(b""), st.just(b"_INBOX.reply")),
        bodies,
        st.one_of(st.none(), st.sampled_from([b"NATS/1.0\r\n\r\n", b"NATS/1.0 408 Request Timeout\r\n\r\n",
                                              b"NATS/1.0\r\nce-id: x\r\n\r\n"])),
    ),
    min_size=1, max_size=12,
)  # fmt: skip


@SETTINGS
@given(frames_on_the_wire, st.lists(st.integers(0, 4000), max_size=6), st.booleans())
def test_the_frame_parser_reads_any_stream_as_nats_pys_parser_and_the_frame_hook(frames, cuts, pings):
    """Whatever the frames and however the stream is cut into chunks, the
    source receives the same deliveries, statuses and drops with the frame
    parser as through nats-py's parser and the frame hook alone."""
    parts = [wire(*frame) for frame in frames]
    if pings:
        parts.insert(len(parts) // 2, b"PING\r\n+OK\r\n")
    stream = b"".join(parts)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})

    async def run(frame_parser: bool):
        source, nc, receive = parsing_source(frame_parser)
        statuses = []
        source._on_status = lambda headers: statuses.append(dict(headers))
        for a, b in itertools.pairwise(bounds):
            await nc._ps.parse(stream[a:b])
        return drain(receive), statuses, dropped(source), nc.passed_on, nc.pings, bytes(nc._ps.buf)

    assert trio.run(run, True) == trio.run(run, False)


async def test_a_parser_that_fails_its_check_leaves_the_frame_hook_in_charge(monkeypatch):
    import dcmstatus.adapters.nats.source as source_module

    monkeypatch.setattr(source_module, "_PARSER_SELF_TEST", {})
    monkeypatch.setattr(internals, "_TEST_OPERATIONS", 99)  # the recorded stream no longer reads as expected
    source = JetStreamSource(NatsSettings(url="nats://fake"), Metrics())
    nc = ParsingNC()
    source._nc, source._sub = nc, nc.sub
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    source._install_fast_path()
    assert source.fast_path and not source.frame_parser and "parse" not in vars(nc._ps)
    await nc._ps.parse(wire(b"dcm.vm", SID, ACK, EVENT, None))
    assert len(drain(receive)) == 1


async def test_a_delivery_carries_the_backlog_its_ack_subject_states():
    """The last number of the ack subject: what the stream still held for the
    consumer (the pipeline lets batches fill while it is not 0)."""
    _source, nc, receive = hooked_source()
    await nc._process_msg(SID, b"dcm.vm", b"$JS.ACK.s.c.1.42.42.1700000000000000000.9137", EVENT, None)
    await nc._process_msg(SID, b"dcm.vm", DOMAIN_ACK.replace(b".0.token", b".12.token"), EVENT, None)
    await nc._process_msg(SID, b"dcm.vm", b"$JS.ACK.s.c.1.44.44.1700000000000000000.x", EVENT, None)
    assert [(d.stream_seq, d.pending, d.unreadable) for d in drain(receive)] == [(42, 9137, None), (43, 12, None), (44, 0, None)]

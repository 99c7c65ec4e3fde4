"""GET /api/v1/status-changes as pages and as a live Server-Sent Events
stream (docs/changes.md#watch-stream), against the real app served by
hypercorn over a real PostgreSQL (http_harness). Stream readers are blocking
http.client connections in worker threads."""

from urllib.parse import urlencode

import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import BASE, assert_problem, rfc3339, serve_api
from sse_client import PATH, EventReader

CHANGE_KEYS = {
    "change_id", "kind", "instance_id", "service_type", "previous_status", "status", "status_message",
    "outputs", "provider_name", "event_time", "commit_time",
}  # fmt: skip


async def open_stream(api, query: dict | None = None, headers: dict | None = None) -> EventReader:
    target = "?" + urlencode(query) if query else ""
    reader = await trio.to_thread.run_sync(EventReader, api.host, api.port, target, {**api.auth(), **(headers or {})})
    if reader.status == 200:
        # The opening frame is the position alone: read it, so the stream is
        # known to be serving (and its "present" fixed) before the test moves on.
        lines = await trio.to_thread.run_sync(reader.frame)
        assert lines is not None and lines[0].startswith("id: ") and len(lines) == 1, lines
        reader.last_id = int(lines[0][4:])
    return reader


async def events(reader: EventReader, n: int) -> list[dict]:
    return await trio.to_thread.run_sync(reader.events, n)


def summary(changes: list[dict]) -> list[tuple]:
    return [(c["kind"], c["instance_id"], c["previous_status"], c["status"]) for c in changes]


async def test_list_pages_oldest_first_with_filters(database_url):
    async with serve_api(database_url) as api:
        for id_, type_ in (("vm1", "vm"), ("vm2", "vm"), ("c1", "container")):
            await api.create(id_, service_type=type_, provider_name="kubevirt")
        await api.request("DELETE", f"{BASE}/vm2")
        await api.sql("UPDATE service_type_instances SET status = 'RUNNING', status_time = now() WHERE instance_id = 'vm1'")

        reply = await api.request("GET", f"{PATH}?max_page_size=2")
        assert reply.status == 200 and reply.headers["content-type"] == "application/json"
        first = reply.json()
        assert summary(first["status_changes"]) == [
            ("created", "vm1", None, "PROVISIONING"),
            ("created", "vm2", None, "PROVISIONING"),
        ]
        change = first["status_changes"][0]
        assert set(change) == CHANGE_KEYS
        assert (change["provider_name"], change["outputs"], change["event_time"]) == ("kubevirt", None, None)
        rfc3339(change["commit_time"])
        reply = await api.request("GET", f"{PATH}?max_page_size=2&page_token={first['next_page_token']}")
        second = reply.json()
        assert summary(second["status_changes"]) == [
            ("created", "c1", None, "PROVISIONING"),
            ("deleted", "vm2", "PROVISIONING", None),
        ]
        reply = await api.request("GET", f"{PATH}?max_page_size=2&page_token={second['next_page_token']}")
        (last,) = reply.json()["status_changes"]
        assert "next_page_token" not in reply.json()
        assert summary([last]) == [("changed", "vm1", "PROVISIONING", "RUNNING")]
        rfc3339(last["event_time"])
        ids = [c["change_id"] for c in first["status_changes"] + second["status_changes"]] + [last["change_id"]]
        assert ids == sorted(ids)

        async def listed(query: str) -> list[tuple]:
            reply = await api.request("GET", f"{PATH}?{query}")
            assert reply.status == 200, reply.body
            return summary(reply.json()["status_changes"])

        assert await listed("instance_id=vm2") == [("created", "vm2", None, "PROVISIONING"), ("deleted", "vm2", "PROVISIONING", None)]
        assert [c[1] for c in await listed("service_type=container")] == ["c1"]
        assert await listed(f"after={ids[3]}") == [("changed", "vm1", "PROVISIONING", "RUNNING")]
        assert await listed(f"after={ids[4]}") == []
        assert await listed("service_type=&instance_id=") == summary(
            first["status_changes"] + second["status_changes"] + [last]
        )

        # Strict parameters; a token continues only its own query.
        token = first["next_page_token"]
        for query in (
            "after=-1", "after=x", "after=", "max_page_size=0", "max_page_size=101", "status=RUNNING",
            "after=1&after=2", f"page_token={token}&service_type=vm", f"page_token={token}&after=0",
            "page_token=forged",
        ):  # fmt: skip
            assert_problem(await api.request("GET", f"{PATH}?{query}"), 400)
        other = (await api.request("GET", f"{BASE}?max_page_size=1")).json()["next_page_token"]
        assert_problem(await api.request("GET", f"{PATH}?page_token={other}"), 400)


async def test_stream_starts_at_the_present_and_follows_with_filters(database_url):
    async with serve_api(database_url) as api:
        await api.create("before")
        everything = await open_stream(api)
        containers = await open_stream(api, {"service_type": "container"})
        one = await open_stream(api, {"instance_id": "vm1"})
        assert everything.headers["content-type"] == "text/event-stream; charset=utf-8"
        try:
            await api.create("vm1")
            await api.create("c1", service_type="container")
            await api.sql("UPDATE service_type_instances SET status = 'RUNNING', status_message = 'up' WHERE instance_id = 'vm1'")
            await api.request("DELETE", f"{BASE}/vm1")
            seen = await events(everything, 4)
            assert summary(seen) == [
                ("created", "vm1", None, "PROVISIONING"),
                ("created", "c1", None, "PROVISIONING"),
                ("changed", "vm1", "PROVISIONING", "RUNNING"),
                ("deleted", "vm1", "RUNNING", None),
            ]
            assert set(seen[0]) == CHANGE_KEYS and seen[2]["status_message"] == "up"
            assert summary(await events(containers, 1)) == [("created", "c1", None, "PROVISIONING")]
            assert [c["kind"] for c in await events(one, 3)] == ["created", "changed", "deleted"]
            # Nothing else came before the next change (no repeat, not "before").
            await api.create("c2", service_type="container")
            assert summary(await events(containers, 1)) == [("created", "c2", None, "PROVISIONING")]
            assert summary(await events(everything, 1)) == [("created", "c2", None, "PROVISIONING")]
        finally:
            for reader in (everything, containers, one):
                reader.close()


async def test_resume_after_a_dropped_connection_yields_exactly_the_missed_changes(database_url):
    async with serve_api(database_url) as api:
        reader = await open_stream(api)
        for n in range(1, 4):
            await api.create(f"a{n}")
        seen = await events(reader, 3)
        reader.close()  # dropped
        for n in range(4, 7):
            await api.create(f"a{n}")
        await api.request("DELETE", f"{BASE}/a1")
        missed = [("created", f"a{n}", None, "PROVISIONING") for n in range(4, 7)]
        missed.append(("deleted", "a1", "PROVISIONING", None))

        # As an EventSource reconnects: its original URL (after=0 here) and
        # Last-Event-ID, which wins.
        resumed = await open_stream(api, {"after": 0}, {"last-event-id": str(seen[-1]["change_id"])})
        by_after = await open_stream(api, {"after": seen[-1]["change_id"]})
        try:
            assert summary(await events(resumed, 4)) == missed
            assert summary(await events(by_after, 4)) == missed
            await api.create("a7")
            assert summary(await events(resumed, 1)) == [("created", "a7", None, "PROVISIONING")]
            assert summary(await events(by_after, 1)) == [("created", "a7", None, "PROVISIONING")]
        finally:
            resumed.close()
            by_after.close()
        reply = await api.request("GET", PATH, headers={"accept": "text/event-stream", "last-event-id": "x"})
        assert_problem(reply, 400)


async def test_stream_needs_the_token_and_is_limited_and_a_leaving_client_frees_its_slot(database_url):
    async with serve_api(database_url, api_token="t0ken", max_watch_streams=1) as api:
        reply = await api.request("GET", PATH, headers={"accept": "text/event-stream", "authorization": ""})
        assert_problem(reply, 401)
        first = await open_stream(api)
        reply = await api.request("GET", PATH, headers={"accept": "text/event-stream"})
        assert_problem(reply, 503)
        assert reply.headers["retry-after"] == "5"
        assert (await api.request("GET", PATH)).status == 200  # the list is not a stream
        assert_problem(await api.request("GET", PATH + "?max_page_size=5", headers={"accept": "text/event-stream"}), 400)
        first.close()
        # The server notices the client left (no change needs to happen) and
        # frees the slot: a new stream gets in.
        with trio.fail_after(10):
            while (second := await open_stream(api)).status != 200:
                second.close()
                await trio.sleep(0.05)
        second.close()


async def test_heartbeats_while_idle_and_streams_end_at_shutdown(database_url):
    async with serve_api(database_url, watch_heartbeat=0.05) as api:
        reader = await open_stream(api)
        assert await trio.to_thread.run_sync(reader.frame) == [": heartbeat"]
        assert await trio.to_thread.run_sync(reader.frame) == [": heartbeat"]
        api.notifier.close()
        with trio.fail_after(10):
            while (lines := await trio.to_thread.run_sync(reader.frame)) is not None:
                assert lines == [": heartbeat"]
        reader.close()
        reply = await api.request("GET", PATH, headers={"accept": "text/event-stream"})
        assert_problem(reply, 503)


async def test_streams_keep_following_when_the_listening_connection_is_lost(database_url):
    async with serve_api(database_url) as api:
        reader = await open_stream(api)
        try:
            await api.create("vm1")
            assert summary(await events(reader, 1)) == [("created", "vm1", None, "PROVISIONING")]
            (killed,) = await api.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dcmstatus-listen'"
            )
            assert killed == (True,)
            await api.create("vm2")  # while nobody listens, or after the reconnect: either way it arrives
            assert summary(await events(reader, 1)) == [("created", "vm2", None, "PROVISIONING")]
            with trio.fail_after(30):  # the listener is back
                while not await api.sql("SELECT 1 FROM pg_stat_activity WHERE application_name = 'dcmstatus-listen'"):
                    await trio.sleep(0.05)
            await api.create("vm3")
            assert summary(await events(reader, 1)) == [("created", "vm3", None, "PROVISIONING")]
        finally:
            reader.close()

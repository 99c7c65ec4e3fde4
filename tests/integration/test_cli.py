"""`dcmstatus instances` and `dcmstatus rejected` against the real HTTP API
(hypercorn + real PostgreSQL, see http_harness). The CLI runs in a worker
thread, as a terminal user would run it next to the service."""

import json
from pathlib import Path

import pytest
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import serve_api

import dcmstatus.cli.commands as cli


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url, api_token="cli-t0ken") as api:
        for n in range(5):
            await api.create(f"vm{n}", provider_name="kubevirt")
        await api.create("web", service_type="container", name="web")
        await api.sql(
            "UPDATE service_type_instances SET status = 'RUNNING', status_message = 'VM is running',"
            " status_time = '2026-04-09T13:08:32Z' WHERE instance_id = 'vm1'"
        )
        await api.sql(
            "INSERT INTO rejected_events (reason, detail, subject, stream_seq, body, instance_id)"
            " VALUES ('unknown_status', 'status \"Flying\" is not a vm status', 'dcm.vm', 41, 'x', 'vm1'),"
            "        ('malformed_json', 'not JSON', 'dcm.vm', 42, 'y', NULL)"
        )
        yield api


async def run(capsys, monkeypatch, argv, env=None):
    monkeypatch.delenv("DCMSTATUS_API_URL", raising=False)
    monkeypatch.delenv("DCMSTATUS_API_TOKEN", raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    def main() -> int:
        try:
            return cli.main(argv)
        except SystemExit as exc:  # argparse refusing the command line
            return exc.code

    code = await trio.to_thread.run_sync(main)
    out, err = capsys.readouterr()
    return code, out, err


async def test_instances_list_table_and_json(api, capsys, monkeypatch):
    env = {"DCMSTATUS_API_TOKEN": "cli-t0ken"}
    code, out, err = await run(capsys, monkeypatch, ["instances", "list", "--api-url", api.url], env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROVIDER", "STATUS", "TIME", "MESSAGE"]
    assert [line.split()[0] for line in lines[1:]] == ["vm0", "vm1", "vm2", "vm3", "vm4", "web"]
    assert lines[2].split() == ["vm1", "vm", "RUNNING", "kubevirt", "2026-04-09T13:08:32Z", "VM", "is", "running"]

    # Filters, pages followed up to --limit, JSON output; the bare command lists.
    argv = ["instances", "--api-url", api.url, "--json", "--limit", "3"]
    code, out, err = await run(capsys, monkeypatch, argv, env)
    assert code == 0 and [i["id"] for i in json.loads(out)] == ["vm0", "vm1", "vm2"]
    argv = ["instances", "list", "--api-url", api.url, "--service-type", "vm", "--status", "running", "--json"]
    code, out, _ = await run(capsys, monkeypatch, argv, env)
    assert [i["id"] for i in json.loads(out)] == ["vm1"]
    argv = ["instances", "list", "--api-url", api.url, "--limit", "2"]
    code, out, err = await run(capsys, monkeypatch, argv, env)
    assert len(out.splitlines()) == 3 and "more exist" in err
    argv = ["instances", "list", "--api-url", api.url, "--service-type", "network"]
    assert (await run(capsys, monkeypatch, argv, env))[1] == "no instances\n"


async def test_instances_get(api, capsys, monkeypatch, tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("cli-t0ken\n")
    argv = ["instances", "get", "vm1", "--api-url", api.url, "--api-token-file", str(token_file)]
    code, out, err = await run(capsys, monkeypatch, argv)
    assert code == 0, err
    assert "status:         RUNNING" in out and "spec:           {}" in out

    code, out, _ = await run(capsys, monkeypatch, [*argv, "--json"])
    assert json.loads(out)["id"] == "vm1"

    argv = ["instances", "get", "nope", "--api-url", api.url, "--api-token-file", str(token_file)]
    code, out, err = await run(capsys, monkeypatch, argv)
    assert (code, out) == (1, "")
    assert err == "dcmstatus instances: no instance 'nope' (HTTP 404)\n"


async def test_rejected(api, capsys, monkeypatch):
    env = {"DCMSTATUS_API_TOKEN": "cli-t0ken", "DCMSTATUS_API_URL": api.url}
    code, out, err = await run(capsys, monkeypatch, ["rejected"], env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "RECEIVED", "REASON", "SUBJECT", "SEQ", "INSTANCE", "DETAIL"]
    assert [line.split()[2] for line in lines[1:]] == ["malformed_json", "unknown_status"]  # newest first

    code, out, _ = await run(capsys, monkeypatch, ["rejected", "--reason", "unknown_status", "--json"], env)
    (event,) = json.loads(out)
    assert (event["stream_seq"], event["instance_id"]) == (41, "vm1")

    code, _, err = await run(capsys, monkeypatch, ["rejected", "--reason", "bogus"], env)
    assert code == 2 and "invalid choice" in err


async def test_errors_say_what_to_do(api, capsys, monkeypatch, tmp_path: Path):
    code, _, err = await run(capsys, monkeypatch, ["instances", "--api-url", api.url])
    assert code == 1
    assert "needs a bearer token" in err and "set DCMSTATUS_API_TOKEN or --api-token-file" in err

    code, _, err = await run(capsys, monkeypatch, ["rejected", "--api-url", api.url], {"DCMSTATUS_API_TOKEN": "bad"})
    assert code == 1 and "the token was refused" in err

    # Nothing listening there.
    code, _, err = await run(capsys, monkeypatch, ["instances", "--api-url", "http://127.0.0.1:9"])
    assert code == 1 and "cannot reach the API at http://127.0.0.1:9" in err

    # No URL and no runtime.json of a running service.
    code, _, err = await run(capsys, monkeypatch, ["instances", "--data-dir", str(tmp_path)])
    assert code == 2 and "start one, or give --api-url (or DCMSTATUS_API_URL)" in err

    # With runtime.json, as `dcmstatus serve` writes it, no URL is needed.
    (tmp_path / "runtime.json").write_text(json.dumps({"http_url": api.url}))
    argv = ["instances", "get", "web", "--data-dir", str(tmp_path), "--json"]
    code, out, err = await run(capsys, monkeypatch, argv, {"DCMSTATUS_API_TOKEN": "cli-t0ken"})
    assert code == 0, err
    assert json.loads(out)["name"] == "web"


async def test_token_from_environment_with_surrounding_whitespace_is_accepted(api, capsys, monkeypatch):
    # As `export DCMSTATUS_API_TOKEN="$(cat token-file)"` or a secret mount gives it.
    argv = ["instances", "get", "vm1", "--api-url", api.url, "--json"]
    code, out, err = await run(capsys, monkeypatch, argv, {"DCMSTATUS_API_TOKEN": "  cli-t0ken\n"})
    assert code == 0, err
    assert json.loads(out)["id"] == "vm1"

"""Connecting to a NATS that is secured the ways deployments secure it — TLS
(server-verified and client-verified), token, user and password, nkey, creds —
against a real nats-server: the JetStream adapter connects and consumes, and
`dcmstatus publish` gets through with the same settings; a wrong secret or an
untrusted certificate ends the connect at once with a message saying what to fix."""

import trio_asyncio  # isort: skip

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nkeys
import pytest
import trio
import trustme

from dcmstatus.adapters.nats.connection import NatsSecurity
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.cli.publish import publish_event
from dcmstatus.core.errors import AccessDenied, PublishError
from dcmstatus.devtools.embedded import EmbeddedNats, write_private
from dcmstatus.engine.metrics import Metrics


class ConfiguredNats(EmbeddedNats):
    """The embedded nats-server, run with the server configuration a test gives."""

    def __init__(self, data_dir: Path, conf: str) -> None:
        super().__init__(data_dir)
        self.conf = conf

    def _prepare(self) -> None:
        write_private(self.config_path, self.conf)

    def _url_for(self, port: int) -> str:
        return f"nats://{self.host}:{port}"

    def address(self, scheme: str = "nats") -> str:
        return f"{scheme}://{self.host}:{self.port}"


@pytest.fixture
def secured_nats(tmp_path: Path):
    servers: list[ConfiguredNats] = []

    def start(conf: str) -> ConfiguredNats:
        server = ConfiguredNats(tmp_path / f"nats-{len(servers)}", conf)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


async def consume_one(url: str, security: NatsSecurity) -> bytes:
    """Publish one event with `dcmstatus publish`'s code, receive and ack it
    through the adapter; its body."""
    settings = NatsSettings(url=url, security=security, max_in_flight=100, max_ack_pending=200, pull_batch=10)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, Metrics())
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(source.run, send)
                await trio_asyncio.aio_as_trio(publish_event)(url, "dcm.vm", b'{"event": 1}', security)
                delivery = await receive.receive()
            await source.ack([delivery.token])
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
    return delivery.body


async def refusal(url: str, security: NatsSecurity) -> str:
    """What the adapter says when the server refuses it; publish must say the same."""
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(NatsSettings(url=url, security=security), Metrics())
        send, _ = trio.open_memory_channel(float("inf"))
        with trio.fail_after(30), pytest.raises(AccessDenied) as caught:
            await source.run(send)
        with trio.fail_after(30), pytest.raises(PublishError) as published:
            await trio_asyncio.aio_as_trio(publish_event)(url, "dcm.vm", b"{}", security)
    assert str(published.value) == str(caught.value)
    return str(caught.value)


# ------------------------------------------------------------------------ TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "server", "client_cert", "client_key", "other_ca")}
    ca.cert_pem.write_to_path(files["ca"])
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(files["server"])
    client = ca.issue_cert("dcmstatus@example.test")
    client.cert_chain_pems[0].write_to_path(files["client_cert"])
    client.private_key_pem.write_to_path(files["client_key"])
    trustme.CA().cert_pem.write_to_path(files["other_ca"])
    return files


def tls_conf(files: dict[str, Path], *, verify: bool = False) -> str:
    extra = f'  ca_file: "{files["ca"]}"\n  verify: true\n' if verify else ""
    return f'tls {{\n  cert_file: "{files["server"]}"\n  key_file: "{files["server"]}"\n{extra}}}\n'


async def test_tls_with_the_ca_connects_and_consumes(secured_nats, tls_files):
    server = secured_nats(tls_conf(tls_files))
    url = server.address("tls")
    assert await consume_one(url, NatsSecurity(tls_ca=tls_files["ca"], tls_url=True)) == b'{"event": 1}'


async def test_tls_with_a_nats_url_and_a_ca_connects_too(secured_nats, tls_files):
    server = secured_nats(tls_conf(tls_files))
    assert await consume_one(server.address(), NatsSecurity(tls_ca=tls_files["ca"])) == b'{"event": 1}'


async def test_tls_server_certificate_of_another_ca_is_refused(secured_nats, tls_files):
    server = secured_nats(tls_conf(tls_files))
    message = await refusal(server.address("tls"), NatsSecurity(tls_ca=tls_files["other_ca"], tls_url=True))
    assert "its TLS certificate is not trusted" in message
    assert "--nats-tls-ca" in message


async def test_tls_client_certificate_is_verified(secured_nats, tls_files):
    server = secured_nats(tls_conf(tls_files, verify=True))
    url = server.address("tls")
    security = NatsSecurity(
        tls_ca=tls_files["ca"], tls_cert=tls_files["client_cert"], tls_key=tls_files["client_key"], tls_url=True
    )
    assert await consume_one(url, security) == b'{"event": 1}'


async def test_tls_without_the_client_certificate_the_server_wants_is_refused(secured_nats, tls_files):
    server = secured_nats(tls_conf(tls_files, verify=True))
    message = await refusal(server.address("tls"), NatsSecurity(tls_ca=tls_files["ca"], tls_url=True))
    assert "verifies client certificates and none was given" in message
    assert "give --nats-tls-cert and --nats-tls-key" in message


# ------------------------------------------------------------ token, password


async def test_token_connects_and_consumes(secured_nats):
    server = secured_nats('authorization {\n  token: "s3cr3t-t0ken"\n}\n')
    assert await consume_one(server.address(), NatsSecurity(token="s3cr3t-t0ken")) == b'{"event": 1}'


async def test_wrong_token_is_refused_and_not_shown(secured_nats):
    server = secured_nats('authorization {\n  token: "s3cr3t-t0ken"\n}\n')
    message = await refusal(server.address(), NatsSecurity(token="wrong-t0ken"))
    assert "refused the credentials" in message and "Authorization Violation" in message
    assert "--nats-token-file or DCMSTATUS_NATS_TOKEN" in message
    assert "wrong-t0ken" not in message


async def test_no_credentials_for_a_server_that_wants_them_says_which_to_give(secured_nats):
    server = secured_nats('authorization {\n  token: "s3cr3t-t0ken"\n}\n')
    message = await refusal(server.address(), NatsSecurity())
    assert "the server needs credentials: give --nats-creds" in message


async def test_user_and_password_connect_and_consume(secured_nats):
    server = secured_nats('authorization {\n  user: "dcm"\n  password: "pa55-w0rd"\n}\n')
    assert await consume_one(server.address(), NatsSecurity(user="dcm", password="pa55-w0rd")) == b'{"event": 1}'


async def test_wrong_password_is_refused(secured_nats):
    server = secured_nats('authorization {\n  user: "dcm"\n  password: "pa55-w0rd"\n}\n')
    message = await refusal(server.address(), NatsSecurity(user="dcm", password="guess"))
    assert "refused the credentials" in message and "check user 'dcm' and its password" in message
    assert "guess" not in message


# ---------------------------------------------------------------- nkey, creds


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def write_seed(path: Path, key: nkeys.KeyPair) -> Path:
    write_private(path, key.seed.decode() + "\n")
    return path


async def test_nkey_seed_connects_and_consumes(secured_nats, tmp_path):
    user = new_key(nkeys.PREFIX_BYTE_USER)
    server = secured_nats(f'authorization {{\n  users: [{{ nkey: "{user.public_key.decode()}" }}]\n}}\n')
    seed = write_seed(tmp_path / "user.nk", user)
    assert await consume_one(server.address(), NatsSecurity(nkey_seed=seed)) == b'{"event": 1}'


async def test_an_unknown_nkey_is_refused(secured_nats, tmp_path):
    listed = new_key(nkeys.PREFIX_BYTE_USER)
    server = secured_nats(f'authorization {{\n  users: [{{ nkey: "{listed.public_key.decode()}" }}]\n}}\n')
    seed = write_seed(tmp_path / "other.nk", new_key(nkeys.PREFIX_BYTE_USER))
    message = await refusal(server.address(), NatsSecurity(nkey_seed=seed))
    assert "refused the credentials" in message and "--nats-nkey-seed" in message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(claims_type: str, subject: nkeys.KeyPair, issuer: nkeys.KeyPair, nats: dict, name: str) -> str:
    """A NATS JWT (ed25519-nkey), as nsc would issue it."""
    claims = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject.public_key.decode(),
        "nats": {**nats, "type": claims_type, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


def operator_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    """(server configuration in operator mode, a user's creds file, a creds
    file of a user of an account the server does not know)."""
    operator, system, account = (new_key(p) for p in (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT, nkeys.PREFIX_BYTE_ACCOUNT))
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1, "leaf": -1, "wildcards": True}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    operator_jwt = jwt("operator", operator, operator, {"system_account": system.public_key.decode()}, "op")
    system_jwt = jwt("account", system, operator, {"limits": unlimited}, "SYS")
    account_jwt = jwt("account", account, operator, {"limits": {**unlimited, **jetstream}}, "dcm")

    def creds(path: Path, account_key: nkeys.KeyPair) -> Path:
        user = new_key(nkeys.PREFIX_BYTE_USER)
        user_jwt = jwt("user", user, account_key, {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}, "dcmstatus")
        write_private(
            path,
            "-----BEGIN NATS USER JWT-----\n" + user_jwt + "\n------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n" + user.seed.decode() + "\n------END USER NKEY SEED------\n",
        )
        return path

    conf = (
        f"operator: {operator_jwt}\n"
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {system.public_key.decode()}: {system_jwt}\n  {account.public_key.decode()}: {account_jwt}\n}}\n"
    )
    stranger = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    return conf, creds(tmp_path / "dcmstatus.creds", account), creds(tmp_path / "stranger.creds", stranger)


async def test_creds_file_connects_and_consumes(secured_nats, tmp_path):
    conf, creds, _ = operator_setup(tmp_path)
    server = secured_nats(conf)
    assert await consume_one(server.address(), NatsSecurity(creds=creds)) == b'{"event": 1}'


async def test_creds_of_an_account_the_server_does_not_know_are_refused(secured_nats, tmp_path):
    conf, _, stranger = operator_setup(tmp_path)
    server = secured_nats(conf)
    message = await refusal(server.address(), NatsSecurity(creds=stranger))
    assert "refused the credentials" in message and f"check the credentials file {stranger}" in message


# ------------------------------------------------------------- the service


def test_serve_consumes_from_a_secured_nats_and_publish_takes_the_same_options(secured_nats, tls_files, tmp_path, database_url, capsys):
    from test_service import start_service, wait_for

    import dcmstatus.cli.commands as cli

    server = secured_nats(tls_conf(tls_files) + 'authorization {\n  token: "s3rve-t0ken"\n}\n')
    token_file = tmp_path / "token"
    token_file.write_text("s3rve-t0ken\n")
    options = ["--nats-tls-ca", str(tls_files["ca"]), "--nats-token-file", str(token_file)]
    svc = start_service(tmp_path, server.address("tls"), database_url, *options)
    try:
        assert svc.http("POST", "/api/v1/service-type-instances?id=vm1", {"service_type": "vm", "spec": {}})[0] == 201
        argv = ["publish", "--nats-url", server.address("tls"), *options,
                "--service-type", "vm", "--instance", "vm1", "--status", "RUNNING"]  # fmt: skip
        assert cli.main(argv) == 0, capsys.readouterr().err
        wait_for(lambda: svc.http("GET", "/api/v1/service-type-instances/vm1")[1]["status"] == "RUNNING", "RUNNING")
        # The change relay has its own connection, with the same TLS and
        # credentials: the creation and the change reach the changes stream.
        wait_for(lambda: svc.metric("dcmstatus_changes_published_total") >= 2, "both changes published")
        assert svc.http("GET", "/api/v1/health")[1]["components"]["changes"] == "publishing"
    finally:
        assert svc.stop() == 0
    assert "s3rve-t0ken" not in svc.log()


def test_serve_with_a_wrong_token_stops_at_once_saying_so(secured_nats, tmp_path, database_url):
    server = secured_nats('authorization {\n  token: "s3rve-t0ken"\n}\n')
    token_file = tmp_path / "token"
    token_file.write_text("not-the-t0ken\n")
    result = subprocess.run(
        [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", server.address(), "--database-url", database_url,
         "--nats-token-file", str(token_file), "--http-port", "0", "--data-dir", str(tmp_path / "svc")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "AccessDenied: NATS at nats://127.0.0.1:" in result.stderr
    assert "refused the credentials (nats: 'Authorization Violation'); check the token" in result.stderr
    assert "not-the-t0ken" not in result.stdout + result.stderr

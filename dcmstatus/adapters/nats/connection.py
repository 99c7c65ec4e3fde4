"""How dcmstatus proves who it is to NATS and checks who NATS is: credentials
(a creds file, an nkey seed, user and password, or a token) and TLS, turned
into nats-py `connect()` options; and the connect itself, which tells a server
that refuses us from one that is not there yet (docs/security.md).

A refusal (credentials rejected, an untrusted server certificate, a client
certificate the server wants) ends the connect at once with AccessDenied: the
same settings will be refused again. A server that cannot be reached is
retried as the caller asked nats-py to.

Imports nothing of nats-py at module level: `dcmstatus config` validates TLS
files through this module without loading the client.
"""

from __future__ import annotations

import contextlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcmstatus.core.errors import AccessDenied
from dcmstatus.core.redaction import redact_url

__all__ = ["NatsSecurity", "open_connection"]


@dataclass(frozen=True)
class NatsSecurity:
    """At most one way to authenticate, and TLS. Secrets never appear in repr."""

    creds: Path | None = None  # user JWT + nkey seed, read by nats-py at every (re)connect
    nkey_seed: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_url: bool = False  # the URL is tls://

    @property
    def tls(self) -> bool:
        return self.tls_url or any((self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def authenticates(self) -> bool:
        return any((self.creds, self.nkey_seed, self.user, self.token))

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's TLS context: the given CA (else the system's) verifies
        the server, the client certificate is offered. Raises OSError or
        ssl.SSLError for a file that is missing or not PEM."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats-py's connect()."""
        options: dict[str, Any] = {}
        if self.creds is not None:
            options["user_credentials"] = str(self.creds)
        if self.nkey_seed is not None:
            options["nkeys_seed"] = str(self.nkey_seed)
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        if self.token is not None:
            options["token"] = self.token
        context = self.ssl_context()
        if context is not None:
            options["tls"] = context
        return options

    def credentials_hint(self) -> str:
        """Which setting to check when the server refuses the credentials."""
        if self.creds is not None:
            return f"check the credentials file {self.creds} (--nats-creds)"
        if self.nkey_seed is not None:
            return f"check the nkey seed in {self.nkey_seed} (--nats-nkey-seed) and that the server lists its public key"
        if self.user is not None:
            return f"check user {self.user!r} and its password (--nats-password-file or DCMSTATUS_NATS_PASSWORD)"
        if self.token is not None:
            return "check the token (--nats-token-file or DCMSTATUS_NATS_TOKEN)"
        return (
            "the server needs credentials: give --nats-creds, --nats-nkey-seed, --nats-user with a password, "
            "or --nats-token-file"
        )


class _Refused(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _wants_a_client_certificate(exc: BaseException, server_info: dict[str, Any], security: NatsSecurity) -> bool:
    # With TLS 1.3 the server rejects a missing client certificate after the
    # client thinks the handshake is done: what we see is then the alert, or
    # (a race) the socket closing under our CONNECT. The server's INFO, sent
    # before TLS, says whether it verifies clients.
    return isinstance(exc, OSError) and bool(server_info.get("tls_verify")) and security.tls_cert is None


def _is_refusal(exc: BaseException, server_info: dict[str, Any], security: NatsSecurity) -> bool:
    if isinstance(exc, ssl.SSLError) or _wants_a_client_certificate(exc, server_info, security):
        return True
    text = str(exc).lower()
    # nats-server's -ERR texts: 'Authorization Violation', 'User Authentication Expired', ...
    return "authorization violation" in text or "authentication" in text


def _explain(exc: BaseException, server_info: dict[str, Any], url: str, security: NatsSecurity) -> AccessDenied:
    where = f"NATS at {redact_url(url)}"
    if _wants_a_client_certificate(exc, server_info, security):
        return AccessDenied(
            f"{where} verifies client certificates and none was given: give --nats-tls-cert and --nats-tls-key"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return AccessDenied(
            f"{where}: its TLS certificate is not trusted ({exc.verify_message or exc.reason}); "
            "give the CA that signed it with --nats-tls-ca, and a URL with the host name the certificate names"
        )
    if isinstance(exc, ssl.SSLError):
        hint = (
            "the server may want a client certificate: give --nats-tls-cert and --nats-tls-key"
            if security.tls_cert is None
            else f"the server did not accept the client certificate {security.tls_cert} (--nats-tls-cert)"
        )
        return AccessDenied(f"{where}: the TLS handshake failed ({exc.reason or exc}); {hint}")
    return AccessDenied(f"{where} refused the credentials ({exc}); {security.credentials_hint()}")


def _server_info(client: Any) -> dict[str, Any]:
    """The INFO the server last sent (nats-py keeps it, without an accessor)."""
    info = getattr(client, "_server_info", None)
    return info if isinstance(info, dict) else {}


async def open_connection(url: str | list[str], security: NatsSecurity, **options: Any) -> Any:
    """nats-py's connect() with `security` applied; the connected client.

    Raises AccessDenied when the server refuses us. Other failures are
    nats-py's (and only happen when `options` limit its retries)."""
    from nats.aio.client import Client

    error_cb = options.pop("error_cb", None)
    connected = False

    async def on_error(exc: Exception) -> None:
        # nats-py keeps retrying a refused first connect as if the server were
        # away; raising here is the one way out of its loop. Later (a refused
        # reconnect) the error is only reported: the connection was good once.
        if not connected and _is_refusal(exc, _server_info(client), security):
            raise _Refused(exc)
        if error_cb is not None:
            await error_cb(exc)

    client = Client()
    try:
        await client.connect(url, error_cb=on_error, **security.connect_options(), **options)
    except _Refused as refused:
        # Not client.close(): after a failed TLS upgrade it waits forever for
        # the plain transport to report closing. Nothing else runs yet (the
        # reader, pinger and flusher start once connected): closing the
        # socket is all there is to clean up.
        transport = getattr(client, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        shown = url if isinstance(url, str) else ",".join(url)
        raise _explain(refused.cause, _server_info(client), shown, security) from None
    connected = True
    return client

"""Keyset page tokens: where a listing continues, bound to its query.

A token is urlsafe base64 of a msgspec cursor (the position and the filters
it was made for) plus a MAC under the deployment's secret, so a token that
was altered or made up is refused instead of misread. Tokens hold nothing
the query does not show; the MAC is what keeps clients from choosing their
own positions. Replicas that should accept each other's tokens need the same
secret (docs/http-api.md#page-tokens).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

import msgspec

from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.core.errors import ConfigError

__all__ = ["ChangeCursor", "InstanceCursor", "PageTokens", "RejectedCursor", "load_or_create_secret"]

_MAC_BYTES = 16
_MAX_TOKEN_CHARS = 1024


class InstanceCursor(msgspec.Struct, array_like=True, tag="i", frozen=True):
    """Where an instance listing continues, and the filters it was made for."""

    after_id: str
    service_type: str | None
    status: str | None
    provider_name: str | None
    id_prefix: str | None = None  # last, with a default: tokens made before it existed still decode


class RejectedCursor(msgspec.Struct, array_like=True, tag="r", frozen=True):
    """Where a dead-letter listing continues, and its reason filter."""

    before_id: int
    reason: str | None


class ChangeCursor(msgspec.Struct, array_like=True, tag="c", frozen=True):
    """Where a status-change listing continues, and the query it was made for."""

    after_change_id: int
    after: int | None  # the query's own `after`
    service_type: str | None
    instance_id: str | None


Cursor = InstanceCursor | RejectedCursor | ChangeCursor
_encoder = msgspec.json.Encoder()
_cursor_decoder = msgspec.json.Decoder(Cursor)


class PageTokens:
    """Encodes cursors as tokens and back, under one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the page token secret is empty")
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.blake2b).digest()[:_MAC_BYTES]

    def encode(self, cursor: Cursor) -> str:
        payload = _encoder.encode(cursor)
        token = base64.urlsafe_b64encode(payload + self._mac(payload))
        return token.rstrip(b"=").decode("ascii")

    def decode(self, token: str) -> Cursor:
        """The cursor of a token made under this secret; 400 otherwise."""
        invalid = HTTPProblem(400, "page_token is invalid; start again without it")
        if len(token) > _MAX_TOKEN_CHARS:
            raise invalid
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except ValueError:
            raise invalid from None
        if len(raw) <= _MAC_BYTES:
            raise invalid
        payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise invalid
        try:
            return _cursor_decoder.decode(payload)
        except msgspec.DecodeError:
            raise invalid from None


def load_or_create_secret(path: Path) -> bytes:
    """The secret kept in `path`; on first use, a new random one written there.

    Created atomically with mode 0600: written to a private temporary file
    (mkstemp), then linked into place, which fails if another process got
    there first, whose secret is then used. A restart reuses the file, so
    tokens given out before it stay valid.
    """
    if (secret := _read_secret(path)) is not None:
        return secret
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(secrets.token_urlsafe(32) + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(partial, path)
        finally:
            os.unlink(partial)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the page token secret {path}: {exc.strerror or exc}; "
            "make its directory writable, or set page_token_secret_file"
        ) from None
    secret = _read_secret(path)
    if secret is None:
        raise ConfigError(f"the page token secret {path} vanished as it was made; start again")
    return secret


def _read_secret(path: Path) -> bytes | None:
    """The secret in `path`; None when there is no such file."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the page token secret {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not secret:
        raise ConfigError(f"the page token secret file {path} is empty: delete it to have a new one made, or fill it")
    return secret.encode("utf-8")

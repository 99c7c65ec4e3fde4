"""Hiding secrets that travel inside connection URLs, so a URL can be logged,
printed or shown by `dcmstatus config` (docs/security.md)."""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact_url"]

REDACTED = "***"

_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^&\s]+)", re.IGNORECASE)
_TOKEN_SCHEMES = ("nats", "tls", "ws", "wss")


def redact_url(url: str) -> str:
    """Hide a password in scheme://user:password@host URLs, a NATS token in
    nats://TOKEN@host, and a password= parameter (URL query or libpq
    key=value form). Everything else, the query included, is kept.
    A list of URLs (--nats-url's comma-separated servers) is redacted entry
    by entry: each may carry its own token."""
    if url.count("://") > 1:
        return ",".join(redact_url(entry) for entry in url.split(","))
    url = _PASSWORD_PARAM.sub(lambda m: m.group(1) + REDACTED, url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    if ":" in userinfo:
        return f"{scheme}://{user}:{REDACTED}@{host}"
    # nats://TOKEN@host: a NATS token sits where a user name would.
    return f"{scheme}://{REDACTED}@{host}" if scheme.lower() in _TOKEN_SCHEMES else url

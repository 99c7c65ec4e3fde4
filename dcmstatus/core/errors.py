"""Every error dcmstatus raises on purpose, in one tree under `DcmstatusError`.

A caller that wants "anything dcmstatus refused or could not do" catches the
base; one that can act on a particular failure catches its class. Adapters
translate driver errors (psycopg, nats-py) into these at their edge, so no
layer above an adapter ever imports a driver to handle its failures.

    DcmstatusError
    ├── ConfigError            a setting is wrong (exit 2; the message names it)
    ├── EmbeddedServerError    an embedded nats-server or PostgreSQL failed to start
    ├── StoreUnavailable       the database cannot be reached now; retry later
    ├── AccessDenied           a server refused our credentials, or TLS failed; retrying cannot help
    ├── StartupTimeout         a dependency stayed unreachable past --startup-timeout (exit 1)
    ├── BatchRefused           the database will never commit this batch as it is
    ├── InstanceExists         a create named an id that is taken
    ├── InvalidInput           the database refused a value of a create
    ├── PublishError           `dcmstatus publish` could not publish
    ├── RelayError             a round of change events was not published (it is retried)
    ├── ApiError               a terminal client got an error from the HTTP API
    └── UsageError             a command was given something it cannot use (exit 2)

Internal control flow (the decoder's rejection signal `cloudevents.Invalid`,
an HTTP problem while handling one request) uses exceptions that never leave
the decoder or the request handler.
"""

from __future__ import annotations

__all__ = [
    "AccessDenied",
    "ApiError",
    "BatchRefused",
    "ConfigError",
    "DcmstatusError",
    "EmbeddedServerError",
    "InstanceExists",
    "InvalidInput",
    "PublishError",
    "RelayError",
    "StartupTimeout",
    "StoreUnavailable",
    "UsageError",
]


class DcmstatusError(Exception):
    """The base of every error dcmstatus raises on purpose."""


class ConfigError(DcmstatusError, ValueError):
    """A configuration value is wrong; the message names it and says what to do."""


class EmbeddedServerError(DcmstatusError, RuntimeError):
    """An embedded server (nats-server or PostgreSQL) could not be started or used."""


class StoreUnavailable(DcmstatusError):
    """The database cannot be reached now (connection lost or refused, pool
    exhausted, server shutting down). Nothing was changed; a retry may work."""


class AccessDenied(DcmstatusError):
    """A server refused the credentials we offered, or the TLS handshake
    failed (an untrusted certificate, a client certificate the server wants).
    Retrying with the same settings cannot help; the message says which to fix."""


class StartupTimeout(DcmstatusError):
    """PostgreSQL or NATS was still unreachable when the start-up deadline
    (--startup-timeout) passed; the message names it and the last error."""


class BatchRefused(DcmstatusError):
    """The store will never commit this batch as it is: something in it is
    refused (a value a column rejects, a trigger's veto). Retrying the same
    batch cannot help; isolating the event at fault can."""


class InstanceExists(DcmstatusError):
    """A create was given an id that is already taken."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} already exists")
        self.instance_id = instance_id


class InvalidInput(DcmstatusError, ValueError):
    """PostgreSQL refused a value given to a create: a NUL character, a JSON
    document it cannot store (e.g. the escape \\u0000), nesting too deep."""


class PublishError(DcmstatusError):
    """`dcmstatus publish` could not reach NATS or the stream did not store the event."""


class RelayError(DcmstatusError):
    """The change relay could not publish a round of change events (NATS did
    not acknowledge them all, or the leader's database connection went); the
    changes wait in the outbox and are published again."""


class ApiError(DcmstatusError):
    """The HTTP API answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UsageError(DcmstatusError):
    """A command was given something it cannot use; printed as one line, exit 2."""

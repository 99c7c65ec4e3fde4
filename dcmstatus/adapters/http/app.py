"""The HTTP API of CONTRACT §6, as a small hand-written ASGI application.

This module owns routing, request parsing and validation, page tokens, and
the mapping of every outcome to a status code and an RFC 7807 problem. Data
access belongs to `InstanceStore`; what "healthy" means and which service
types exist belong to the caller, who passes them to `make_app`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from importlib.resources import files
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_to_bytes

import msgspec
import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dcmstatus.adapters.postgres.instances import Instance, InstanceStore, RejectedEvent
from dcmstatus.core.errors import InstanceExists, InvalidInput
from dcmstatus.core.model import REJECTION_REASONS

__all__ = ["MAX_BODY_BYTES", "OPENAPI_DOCUMENT", "make_app"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # the default request body limit
# How much of a too-large body is read and dropped before the 413, as a
# multiple of the limit (see Request.body).
_DRAIN_FACTOR = 8
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
# Client-chosen instance ids (CONTRACT §6): a DNS label.
_ID_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PAGE_SIZE_RE = re.compile(r"[0-9]{1,4}")
_MAX_TOKEN_CHARS = 1024

# Page tokens are integrity-checked, not secret: they hold only what the query
# itself shows. Every replica must use the same key to accept the others'
# tokens, hence a fixed default rather than a random per-process one.
_DEFAULT_TOKEN_KEY = b"dcmstatus/page-token/v1"
_MAC_BYTES = 16

# The OpenAPI 3 document describing every route here, kept in the repository
# and served as it is (tests check the live API against it).
OPENAPI_DOCUMENT: bytes = files(__package__).joinpath("openapi.json").read_bytes()
# Routes a client may call without the API token: liveness probes and
# Prometheus scrapers carry no credentials and these expose no instance data.
_OPEN_ROUTES = (["api", "v1", "health"], ["metrics"])

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


# --- JSON shapes -------------------------------------------------------------


class CreateInstanceRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    service_type: str
    # Kept as JSON text: it goes to a jsonb column as it came, PostgreSQL
    # validates it, and Python never walks an arbitrarily nested document.
    spec: msgspec.Raw
    name: str | None = None  # null means absent
    agent_name: str | None = None
    provider_name: str | None = None


class Problem(msgspec.Struct, frozen=True):
    type: str
    title: str
    status: int
    detail: str


class InstancePage(msgspec.Struct, omit_defaults=True):
    instances: list[Instance]
    next_page_token: str | None = None


class RejectedEventPage(msgspec.Struct, omit_defaults=True):
    rejected_events: list[RejectedEvent]
    next_page_token: str | None = None


class Health(msgspec.Struct):
    status: str  # "ok" | "unavailable"
    components: dict[str, Any]


class _InstanceCursor(msgspec.Struct, array_like=True, tag="i", frozen=True):
    """Where an instance listing continues, and the filters it was made for."""

    after_id: str
    service_type: str | None
    status: str | None
    provider_name: str | None


class _RejectedCursor(msgspec.Struct, array_like=True, tag="r", frozen=True):
    before_id: int
    reason: str | None


_encoder = msgspec.json.Encoder()
_create_decoder = msgspec.json.Decoder(CreateInstanceRequest)
_cursor_decoder = msgspec.json.Decoder(_InstanceCursor | _RejectedCursor)


# --- requests, responses, problems -------------------------------------------


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class HTTPProblem(Exception):
    """Raised anywhere while handling a request; becomes a problem response."""

    def __init__(self, status: int, detail: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> Response:
        body = Problem("about:blank", HTTPStatus(self.status).phrase, self.status, self.detail)
        return Response(
            self.status, _encoder.encode(body), "application/problem+json", self.headers
        )


class _ClientGone(Exception):
    """The client disconnected before sending its whole request."""


class Request:
    """One HTTP request: method, path, query and a body read on demand."""

    def __init__(self, scope: Scope, receive: Receive, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.max_body_bytes = max_body_bytes
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._scope = scope
        self._receive = receive

    def path_segments(self) -> list[str] | None:
        """The path split on "/" and percent-decoded per segment, so that an
        id holding %2F stays one segment; None when not valid UTF-8."""
        raw = self._scope.get("raw_path")
        if raw is None:  # optional in ASGI; `path` is already decoded
            return self.path.split("/")[1:]
        try:
            return [unquote_to_bytes(s).decode("utf-8") for s in raw.split(b"/")[1:]]
        except UnicodeDecodeError:
            return None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self._scope["headers"]:
            if key.lower() == name:
                return value
        return None

    def query(self, allowed: Iterable[str]) -> dict[str, str]:
        """The query parameters, each at most once and all of them known.

        Strict on purpose: a misspelt filter silently ignored would return
        everything, which looks like an answer.
        """
        try:
            pairs = parse_qsl(
                self._scope.get("query_string", b"").decode("utf-8"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
            )
        except UnicodeDecodeError:
            raise HTTPProblem(400, "the query string is not valid UTF-8") from None
        allowed = set(allowed)
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in allowed:
                known = ", ".join(sorted(allowed)) or "none"
                raise HTTPProblem(400, f"unknown query parameter {name!r} (known: {known})")
            if name in params:
                raise HTTPProblem(400, f"query parameter {name!r} given more than once")
            if "\x00" in value:
                raise HTTPProblem(400, f"query parameter {name!r} contains a NUL character")
            params[name] = value
        return params

    async def body(self) -> bytes:
        """The whole request body, at most `max_body_bytes` (else 413).

        A body somewhat over the limit is read to its end and dropped before
        answering: hypercorn closes a connection whose request was not read
        completely, and a client still sending then sees a reset, not the 413.
        A body far over the limit is refused unread.
        """
        limit = self.max_body_bytes
        drain_limit = _DRAIN_FACTOR * limit
        too_large = HTTPProblem(413, f"the request body exceeds {limit} bytes")
        declared = self.header(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > drain_limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            if not message.get("more_body", False) or size > drain_limit:
                break
        if size > limit:
            raise too_large
        return b"".join(chunks)


def _json(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, _encoder.encode(value), "application/json", headers)


def _page_size(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE_SIZE
    if not _PAGE_SIZE_RE.fullmatch(value) or not 1 <= int(value) <= MAX_PAGE_SIZE:
        raise HTTPProblem(400, f"max_page_size must be an integer from 1 to {MAX_PAGE_SIZE}")
    return int(value)


class _PageTokens:
    """Opaque page tokens: urlsafe base64 of a msgspec cursor plus a MAC, so a
    token that was altered or made up is refused instead of misread."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.blake2b).digest()[:_MAC_BYTES]

    def encode(self, cursor: _InstanceCursor | _RejectedCursor) -> str:
        payload = _encoder.encode(cursor)
        token = base64.urlsafe_b64encode(payload + self._mac(payload))
        return token.rstrip(b"=").decode("ascii")

    def decode(self, token: str) -> _InstanceCursor | _RejectedCursor:
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


# --- the application ---------------------------------------------------------


Handler = Callable[..., Awaitable[Response]]


class _Api:
    def __init__(
        self,
        store: InstanceStore,
        service_types: Callable[[], Iterable[str]],
        health: HealthCheck,
        registry: CollectorRegistry,
        page_token_key: bytes,
        api_token: str | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._max_body_bytes = max_body_bytes
        self._api_token = None if not api_token else api_token.encode("utf-8")
        self._store = store
        self._service_types = service_types
        self._health_check = health
        self._registry = registry
        self._tokens = _PageTokens(page_token_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no websockets: returning without accepting refuses it
        request = Request(scope, receive, self._max_body_bytes)
        try:
            response = await self._dispatch(request)
        except HTTPProblem as problem:
            response = problem.response()
        except _ClientGone:
            return
        except psycopg.OperationalError:
            # Connection lost, pool exhausted or closed, server shutting down:
            # the client may retry; the details stay in our log.
            log.warning("%s %s: database unavailable", request.method, request.path, exc_info=True)
            response = HTTPProblem(
                503, "the database is unavailable; retry later", (("retry-after", "1"),)
            ).response()
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = HTTPProblem(500, "the server failed to handle the request").response()
        await _send(send, response, with_body=request.method != "HEAD")

    def _route(self, segments: list[str]) -> tuple[dict[str, Handler], tuple[str, ...]] | None:
        match segments:
            case ["metrics"]:
                return {"GET": self._metrics}, ()
            case ["api", "v1", "health"]:
                return {"GET": self._health}, ()
            case ["api", "v1", "service-type-instances"]:
                return {"GET": self._list, "POST": self._create}, ()
            case ["api", "v1", "service-type-instances", instance_id] if instance_id:
                return {"GET": self._get, "DELETE": self._delete}, (instance_id,)
            case ["api", "v1", "rejected-events"]:
                return {"GET": self._rejected}, ()
            case ["api", "v1", "openapi.json"]:
                return {"GET": self._openapi}, ()
        return None

    def _authorize(self, request: Request, segments: list[str] | None) -> None:
        """With an API token set, every /api/v1 path but health needs it.

        Checked before routing, so without the token even a 404 or 405 says
        nothing about what exists.
        """
        if self._api_token is None or segments in _OPEN_ROUTES:
            return
        if segments is not None and segments[:1] != ["api"]:
            return  # not under /api: nothing there but /metrics and 404s
        header = (request.header(b"authorization") or b"").strip()
        challenge = 'Bearer realm="dcmstatus"'
        if not header:
            raise HTTPProblem(
                401,
                "this API needs a bearer token: send 'Authorization: Bearer <token>'",
                (("www-authenticate", challenge),),
            )
        scheme, _, credentials = header.partition(b" ")
        # compare_digest on equal-type bytes: the time taken says nothing
        # about how much of the token was right.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            credentials.strip(), self._api_token
        ):
            raise HTTPProblem(
                401,
                "the bearer token is wrong",
                (("www-authenticate", challenge + ', error="invalid_token"'),),
            )

    async def _dispatch(self, request: Request) -> Response:
        segments = request.path_segments()
        self._authorize(request, segments)
        route = None if segments is None else self._route(segments)
        if route is None:
            raise HTTPProblem(404, f"no resource at {request.path}")
        methods, params = route
        if "GET" in methods:
            methods = {**methods, "HEAD": methods["GET"]}
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            raise HTTPProblem(
                405, f"{request.method} is not allowed here (allowed: {allow})", (("allow", allow),)
            )
        return await handler(request, *params)

    # --- handlers ---

    async def _create(self, request: Request) -> Response:
        instance_id = request.query(["id"]).get("id")
        if instance_id is not None and not _ID_RE.fullmatch(instance_id):
            raise HTTPProblem(
                400,
                "id must be 1 to 63 lowercase letters, digits or '-',"
                " starting and ending with a letter or digit",
            )
        body = await request.body()
        try:
            body.decode("utf-8")  # JSON is UTF-8 (RFC 8259); spec is not checked by msgspec
            create = _create_decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise HTTPProblem(422, f"invalid request body: {exc}") from None
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise HTTPProblem(400, "the request body is not valid JSON") from None
        except RecursionError:
            raise HTTPProblem(400, "the request body is nested too deeply") from None
        if not bytes(create.spec).startswith(b"{"):
            raise HTTPProblem(422, "invalid request body: spec must be a JSON object - at `$.spec`")
        known = frozenset(self._service_types())
        if create.service_type not in known:
            raise HTTPProblem(
                422,
                f"unknown service type {create.service_type!r} (known: {', '.join(sorted(known))})",
            )
        try:
            instance = await self._store.create(
                create.service_type,
                create.spec,
                name=create.name or "",
                agent_name=create.agent_name or "",
                provider_name=create.provider_name or "",
                instance_id=instance_id,
            )
        except InstanceExists as exc:
            raise HTTPProblem(409, f"instance {exc.instance_id!r} already exists") from None
        except InvalidInput as exc:
            raise HTTPProblem(422, f"invalid request body: cannot store a value: {exc}") from None
        location = f"/api/v1/{instance.path}"
        return _json(201, instance, (("location", location),))

    async def _get(self, request: Request, instance_id: str) -> Response:
        request.query(())
        instance = None if "\x00" in instance_id else await self._store.get(instance_id)
        if instance is None:
            raise HTTPProblem(404, f"no instance {instance_id!r}")
        return _json(200, instance)

    async def _delete(self, request: Request, instance_id: str) -> Response:
        request.query(())
        if "\x00" in instance_id or not await self._store.delete(instance_id):
            raise HTTPProblem(404, f"no instance {instance_id!r}")
        return Response(204, content_type=None)

    async def _list(self, request: Request) -> Response:
        query = request.query(
            ["service_type", "status", "provider_name", "max_page_size", "page_token"]
        )
        page_size = _page_size(query.get("max_page_size"))
        # An empty filter is no filter. Statuses are stored upper case and
        # matched case-insensitively everywhere else, so here too.
        service_type = query.get("service_type") or None
        status = (query.get("status") or "").upper() or None
        provider_name = query.get("provider_name") or None
        after_id = None
        if token := query.get("page_token"):
            cursor = self._tokens.decode(token)
            # A token continues the query it came from; with other filters
            # its position would be meaningless (max_page_size may change).
            if not isinstance(cursor, _InstanceCursor) or (
                cursor.service_type,
                cursor.status,
                cursor.provider_name,
            ) != (service_type, status, provider_name):
                raise HTTPProblem(400, "page_token belongs to a different query")
            if "\x00" in cursor.after_id:
                raise HTTPProblem(400, "page_token is invalid; start again without it")
            after_id = cursor.after_id
        instances, next_after = await self._store.list(
            service_type=service_type,
            status=status,
            provider_name=provider_name,
            page_size=page_size,
            after_id=after_id,
        )
        next_token = None
        if next_after is not None:
            cursor = _InstanceCursor(next_after, service_type, status, provider_name)
            next_token = self._tokens.encode(cursor)
        return _json(200, InstancePage(instances, next_token))

    async def _rejected(self, request: Request) -> Response:
        query = request.query(["reason", "max_page_size", "page_token"])
        page_size = _page_size(query.get("max_page_size"))
        reason = query.get("reason") or None
        if reason is not None and reason not in REJECTION_REASONS:
            raise HTTPProblem(
                400, f"unknown reason {reason!r} (known: {', '.join(REJECTION_REASONS)})"
            )
        before_id = None
        if token := query.get("page_token"):
            cursor = self._tokens.decode(token)
            if not isinstance(cursor, _RejectedCursor) or cursor.reason != reason:
                raise HTTPProblem(400, "page_token belongs to a different query")
            before_id = cursor.before_id
        events, next_before = await self._store.rejected(
            reason=reason, page_size=page_size, before_id=before_id
        )
        next_token = None
        if next_before is not None:
            next_token = self._tokens.encode(_RejectedCursor(next_before, reason))
        return _json(200, RejectedEventPage(events, next_token))

    async def _health(self, request: Request) -> Response:
        request.query(())
        try:
            ok, components = await self._health_check()
        except Exception:
            log.exception("health check failed")
            ok, components = False, {}
        body = Health("ok" if ok else "unavailable", components)
        return _json(200 if ok else 503, body, (("cache-control", "no-store"),))

    async def _openapi(self, request: Request) -> Response:
        request.query(())
        return Response(200, OPENAPI_DOCUMENT, "application/json")

    async def _metrics(self, request: Request) -> Response:
        return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)


async def _lifespan(receive: Receive, send: Send) -> None:
    # Nothing to set up: the caller owns the pool and the store.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send(send: Send, response: Response, *, with_body: bool) -> None:
    headers = []
    if response.status != 204:  # RFC 9110 §8.6: a 204 carries no Content-Length
        headers.append((b"content-length", str(len(response.body)).encode("ascii")))
    if response.content_type is not None:
        headers.append((b"content-type", response.content_type.encode("latin-1")))
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": response.body if with_body else b""})


def make_app(
    store: InstanceStore,
    catalog_service_types: Callable[[], Iterable[str]] | set[str] | frozenset[str],
    health: HealthCheck,
    metrics_registry: CollectorRegistry,
    *,
    page_token_key: bytes = _DEFAULT_TOKEN_KEY,
    api_token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> ASGIApp:
    """The ASGI application serving /api/v1 and /metrics.

    `catalog_service_types` is asked on every create, so a catalog reloaded
    at run time is honoured. `health` returns (ok, {component: state}).
    With `api_token`, every /api/v1 route except health requires
    `Authorization: Bearer <api_token>` (401 otherwise); /metrics stays open.
    Request bodies over `max_body_bytes` are refused with 413.
    """
    if callable(catalog_service_types):
        service_types = catalog_service_types
    else:
        fixed = frozenset(catalog_service_types)
        service_types = lambda: fixed
    return _Api(store, service_types, health, metrics_registry, page_token_key, api_token, max_body_bytes)

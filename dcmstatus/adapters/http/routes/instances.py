"""/api/v1/service-type-instances: create, list (keyset pages), get, delete."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dcmstatus.adapters.http.inputs import page_size, query_params, read_body
from dcmstatus.adapters.http.page_tokens import InstanceCursor, PageTokens
from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.adapters.http.responses import JSONResponse
from dcmstatus.adapters.http.routing import resource
from dcmstatus.adapters.postgres.instances import Instance, InstanceStore
from dcmstatus.core.errors import InstanceExists, InvalidInput

__all__ = ["InstanceRoutes"]

BASE = "/api/v1/service-type-instances"
# Client-chosen instance ids: a DNS label (docs/http-api.md).
_ID_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# What the start of an id can be: of a client-chosen id or a generated UUID.
_ID_PREFIX_RE = re.compile(r"[a-z0-9-]{1,63}")


class CreateInstanceRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    service_type: str
    # Kept as JSON text: it goes to a jsonb column as it came, PostgreSQL
    # validates it, and Python never walks an arbitrarily nested document.
    spec: msgspec.Raw
    name: str | None = None  # null means absent
    agent_name: str | None = None
    provider_name: str | None = None


class InstancePage(msgspec.Struct, omit_defaults=True):
    instances: list[Instance]
    next_page_token: str | None = None


_create_decoder = msgspec.json.Decoder(CreateInstanceRequest)


class InstanceRoutes:
    """`service_types` is asked on every create, so a catalog reloaded at run
    time is honoured."""

    def __init__(
        self,
        store: InstanceStore,
        service_types: Callable[[], Iterable[str]],
        tokens: PageTokens,
        max_body_bytes: int,
    ) -> None:
        self._store = store
        self._service_types = service_types
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        self.routes: list[Route] = [
            resource(BASE, get=self.page, post=self.create),
            resource(BASE + "/{id:segment}", get=self.get, delete=self.delete),
        ]

    async def create(self, request: Request) -> Response:
        instance_id = query_params(request, ["id"]).get("id")
        if instance_id is not None and not _ID_RE.fullmatch(instance_id):
            raise HTTPProblem(
                400,
                "id must be 1 to 63 lowercase letters, digits or '-',"
                " starting and ending with a letter or digit",
            )
        body = await read_body(request, self._max_body_bytes)
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
        return JSONResponse(instance, 201, {"location": f"/api/v1/{instance.path}"})

    async def get(self, request: Request) -> Response:
        query_params(request, ())
        instance_id = request.path_params["id"]
        instance = None if "\x00" in instance_id else await self._store.get(instance_id)
        if instance is None:
            raise HTTPProblem(404, f"no instance {instance_id!r}")
        return JSONResponse(instance)

    async def delete(self, request: Request) -> Response:
        query_params(request, ())
        instance_id = request.path_params["id"]
        if "\x00" in instance_id or not await self._store.delete(instance_id):
            raise HTTPProblem(404, f"no instance {instance_id!r}")
        return Response(status_code=204)

    async def page(self, request: Request) -> Response:
        query = query_params(
            request, ["service_type", "status", "provider_name", "id_prefix", "max_page_size", "page_token"]
        )
        size = page_size(query.get("max_page_size"))
        # An empty filter is no filter. Statuses are stored upper case and
        # matched case-insensitively everywhere else, so here too.
        service_type = query.get("service_type") or None
        status = (query.get("status") or "").upper() or None
        provider_name = query.get("provider_name") or None
        id_prefix = query.get("id_prefix") or None
        if id_prefix is not None and not _ID_PREFIX_RE.fullmatch(id_prefix):
            # Strict: a prefix no id can have would list nothing, which looks
            # like an answer (ids are lowercase; docs/http-api.md#instances).
            raise HTTPProblem(400, "id_prefix must be 1 to 63 lowercase letters, digits or '-'")
        after_id = None
        if token := query.get("page_token"):
            cursor = self._tokens.decode(token)
            # A token continues the query it came from; with other filters
            # its position would be meaningless (max_page_size may change).
            if not isinstance(cursor, InstanceCursor) or (
                cursor.service_type,
                cursor.status,
                cursor.provider_name,
                cursor.id_prefix,
            ) != (service_type, status, provider_name, id_prefix):
                raise HTTPProblem(400, "page_token belongs to a different query")
            if "\x00" in cursor.after_id:
                raise HTTPProblem(400, "page_token is invalid; start again without it")
            after_id = cursor.after_id
        instances, next_after = await self._store.list(
            service_type=service_type,
            status=status,
            provider_name=provider_name,
            page_size=size,
            after_id=after_id,
            id_prefix=id_prefix,
        )
        next_token = None
        if next_after is not None:
            next_token = self._tokens.encode(InstanceCursor(next_after, service_type, status, provider_name, id_prefix))
        return JSONResponse(InstancePage(instances, next_token))

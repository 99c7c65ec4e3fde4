"""JSON responses encoded by msgspec, and RFC 7807 problem responses."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import msgspec
from starlette.responses import Response

__all__ = ["JSONResponse", "Problem", "ProblemResponse"]

_encoder = msgspec.json.Encoder()


class JSONResponse(Response):
    """`content` (msgspec Structs, Raw, plain values) as application/json."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


class Problem(msgspec.Struct, frozen=True):
    """The body of every error response (RFC 7807)."""

    type: str
    title: str
    status: int
    detail: str


class ProblemResponse(Response):
    """An application/problem+json response; `detail` says what to do next."""

    media_type = "application/problem+json"

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        problem = Problem("about:blank", HTTPStatus(status).phrase, status, detail)
        super().__init__(problem, status_code=status, headers=headers)

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)

"""What a request brings, checked: query parameters (strict), the page size,
and a body within the size limit."""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import aclosing
from urllib.parse import parse_qsl

from starlette.requests import Request

from dcmstatus.adapters.http.problems import HTTPProblem

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_BODY_BYTES", "MAX_PAGE_SIZE", "page_size", "query_params", "read_body"]

MAX_BODY_BYTES = 1024 * 1024  # the default request body limit
# How much of a too-large body is read and dropped before the 413, as a
# multiple of the limit (see read_body).
_DRAIN_FACTOR = 8
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
_PAGE_SIZE_RE = re.compile(r"[0-9]{1,4}")


def query_params(request: Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once and all of them known (400
    otherwise). Strict on purpose: a misspelt filter silently ignored would
    return everything, which looks like an answer.

    Starlette's `query_params` replaces bad UTF-8 and keeps the last of
    repeated names; both would hide a client's mistake, hence our own parse.
    """
    try:
        pairs = parse_qsl(
            request.scope.get("query_string", b"").decode("utf-8"),
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


def page_size(value: str | None) -> int:
    if value is None:
        return DEFAULT_PAGE_SIZE
    if not _PAGE_SIZE_RE.fullmatch(value) or not 1 <= int(value) <= MAX_PAGE_SIZE:
        raise HTTPProblem(400, f"max_page_size must be an integer from 1 to {MAX_PAGE_SIZE}")
    return int(value)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes (413 otherwise).

    A body somewhat over the limit is read to its end and dropped before
    answering: hypercorn closes a connection whose request was not read
    completely, and a client still sending then sees a reset, not the 413.
    A body far over the limit (by its Content-Length) is refused unread.
    The limit applies where a handler reads a body, so a request that fails
    earlier (bad query, wrong method) gets that answer instead.
    """
    drain_limit = _DRAIN_FACTOR * limit
    too_large = HTTPProblem(413, f"the request body exceeds {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > drain_limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async with aclosing(request.stream()) as stream:  # ClientDisconnect if the client leaves
        async for chunk in stream:
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > drain_limit:
                break
    if size > limit:
        raise too_large
    return b"".join(chunks)

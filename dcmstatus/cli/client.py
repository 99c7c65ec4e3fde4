"""The terminal clients' view of the HTTP API: where it is (flag, environment
or a running serve's runtime.json), the token, GET with RFC 7807 errors turned
into one readable line, following page tokens, and reading an event stream."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dcmstatus.config import env_name, runtime_value
from dcmstatus.core.errors import ApiError, UsageError


class ApiClient:
    """A small client of a running service's HTTP API: base URL and token
    from flags, environment or runtime.json; errors as ApiError / UsageError."""


    def __init__(self, args: argparse.Namespace) -> None:
        env = os.environ
        url = getattr(args, "api_url", None) or env.get(env_name("api_url"))
        if not url:
            data_dir = getattr(args, "data_dir", None) or Path(env.get(env_name("data_dir"), ".dcmstatus"))
            url = runtime_value(data_dir, "http_url")
            if not url:
                raise UsageError(
                    f"no API URL: found no {data_dir / 'runtime.json'} of a running `dcmstatus serve`; "
                    f"start one, or give --api-url (or {env_name('api_url')})"
                )
        self.url = url.rstrip("/")
        self.token = self._token(args, env)
        self.timeout = 30.0

    @staticmethod
    def _token(args: argparse.Namespace, env: Any) -> str | None:
        path = getattr(args, "api_token_file", None) or env.get(env_name("api_token_file"))
        if path:
            try:
                token = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise UsageError(f"cannot read the API token file {path}: {exc.strerror or exc}") from None
            if not token:
                raise UsageError(f"the API token file {path} is empty")
            return token
        return (env.get(env_name("api_token")) or "").strip() or None  # as the server and the file do

    def get(self, path: str, query: dict[str, Any] | None = None) -> Any:
        import urllib.error
        import urllib.request
        from urllib.parse import urlencode

        target = f"{self.url}{path}"
        query = {k: v for k, v in (query or {}).items() if v is not None}
        if query:
            target += "?" + urlencode(query)
        request = urllib.request.Request(target, headers={"accept": "application/json"})
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise self._problem(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(
                f"cannot reach the API at {self.url} ({reason}); is `dcmstatus serve` running there? "
                f"Check --api-url or {env_name('api_url')}"
            ) from None
        except ValueError:
            raise ApiError(f"{target} did not answer with JSON; is {self.url} a dcmstatus service?") from None

    def events(
        self, path: str, query: dict[str, Any], last_event_id: int | None, read_timeout: float
    ) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """One connection's Server-Sent Events: (id, data) for each frame
        with an id (data None for a frame with an id alone, which only moves
        the position); ends when the server ends the stream.

        Raises ApiError for an error answer (with its status) or a connection
        that fails, including nothing received for `read_timeout` seconds
        (the server sends a heartbeat far more often).
        """
        import urllib.error
        import urllib.request
        from urllib.parse import urlencode

        query = {k: v for k, v in query.items() if v is not None}
        target = f"{self.url}{path}" + ("?" + urlencode(query) if query else "")
        request = urllib.request.Request(target, headers={"accept": "text/event-stream"})
        if self.token:
            request.add_header("authorization", f"Bearer {self.token}")
        if last_event_id is not None:
            request.add_header("last-event-id", str(last_event_id))
        try:
            with urllib.request.urlopen(request, timeout=read_timeout) as response:
                fields: dict[str, str] = {}
                for raw in response:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line:
                        if not line.startswith(":"):  # ":" starts a comment (heartbeats)
                            name, _, value = line.partition(":")
                            fields[name] = value.removeprefix(" ")
                        continue
                    if fields.get("id", "").isdigit():
                        data = fields.get("data")
                        yield int(fields["id"]), None if data is None else json.loads(data)
                    fields = {}
        except urllib.error.HTTPError as exc:
            raise self._problem(exc) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"lost the stream from {self.url} ({reason})") from None

    def _problem(self, exc: Any) -> ApiError:
        try:
            detail = json.loads(exc.read()).get("detail") or exc.reason
        except (ValueError, AttributeError, OSError):
            detail = exc.reason
        if exc.code == 401:
            hint = (
                "the token was refused: check it"
                if self.token
                else f"the service needs an API token: set {env_name('api_token')} or --api-token-file"
            )
            return ApiError(f"{detail} ({hint})", 401)
        return ApiError(f"{detail} (HTTP {exc.code})", exc.code)

    def pages(self, path: str, key: str, query: dict[str, Any], limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` items, following next_page_token; and whether more exist."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            page = self.get(path, {**query, "max_page_size": min(100, limit - len(items)), "page_token": token})
            items += page[key]
            token = page.get("next_page_token")
            if token is None:
                return items, False
            if len(items) >= limit:
                return items, True

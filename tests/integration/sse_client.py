"""A plain, blocking Server-Sent Events reader for the tests (http.client):
each frame as the server sent it, so tests see ids, comments and events."""

from __future__ import annotations

import http.client
import json
from typing import Any

PATH = "/api/v1/status-changes"


class EventReader:
    def __init__(self, host: str, port: int, query: str = "", headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.conn.request("GET", PATH + query, headers={"accept": "text/event-stream", **(headers or {})})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}
        self.last_id: int | None = None

    def frame(self) -> list[str] | None:
        """The lines of the next frame (up to a blank line); None at the end of the stream."""
        lines: list[str] = []
        while True:
            raw = self.response.readline()
            if not raw:
                return None
            line = raw.decode("utf-8").rstrip("\n")
            if line == "":
                if lines:
                    return lines
                continue
            lines.append(line)

    def event(self) -> dict[str, Any] | None:
        """The next status-change event's data (ids seen on the way are kept
        in last_id); None at the end of the stream."""
        while (lines := self.frame()) is not None:
            fields = dict(line.split(": ", 1) for line in lines if not line.startswith(":"))
            if "id" in fields:
                self.last_id = int(fields["id"])
            if "data" in fields:
                assert fields["event"] == "status-change", lines
                change = json.loads(fields["data"])
                assert change["change_id"] == self.last_id, lines
                return change
        return None

    def events(self, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            event = self.event()
            assert event is not None, f"the stream ended after {out}"
            out.append(event)
        return out

    def close(self) -> None:
        self.conn.close()

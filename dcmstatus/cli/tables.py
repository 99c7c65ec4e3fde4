"""Plain-text rendering for the terminal clients: aligned tables, one-line
summaries and the footer that says when more rows exist."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    if not rows:
        return ""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def footer(count: int, more: bool, one: str, many: str) -> None:
    if count == 0:
        print(f"no {many}")
    elif more:
        print(f"({count} {many} shown; more exist: raise --limit or narrow the filters)", file=sys.stderr)


def instance_details(i: dict[str, Any]) -> str:
    fields = [
        ("id", i["id"]), ("service type", i["service_type"]), ("status", i["status"]),
        ("status message", i["status_message"]), ("status time", i["status_time"] or "-"),
        ("name", i["name"]), ("agent", i["agent_name"]), ("provider", i["provider_name"]),
        ("created", i["create_time"]), ("updated", i["update_time"]),
        ("spec", json.dumps(i["spec"], sort_keys=True)),
        ("outputs", "-" if i["outputs"] is None else json.dumps(i["outputs"], sort_keys=True)),
    ]
    width = max(len(k) for k, _ in fields)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in fields)

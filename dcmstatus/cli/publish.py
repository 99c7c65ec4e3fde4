"""`dcmstatus publish`: one status event, built with the official CloudEvents
SDK and sent the way providers do (structured mode, subject dcm.<type>),
through JetStream so the command can say the stream stored it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import nats.errors
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from dcmstatus.adapters.nats.connection import NatsSecurity, open_connection
from dcmstatus.config import runtime_value
from dcmstatus.core.errors import AccessDenied, PublishError
from dcmstatus.core.redaction import redact_url

DEFAULT_SOURCE = "dcm/providers/dcmstatus-cli"


def build_event(
    service_type: str,
    instance_id: str,
    status: str,
    message: str | None = None,
    source: str = DEFAULT_SOURCE,
    time: datetime | None = None,
) -> bytes:
    """The structured-mode CloudEvent body a provider would publish."""
    data: dict[str, str] = {"id": instance_id, "status": status}
    if message is not None:
        data["message"] = message
    event = CloudEvent(
        {
            "id": str(uuid.uuid4()),
            "source": source,
            "type": f"dcm.status.{service_type}",
            "subject": f"dcm.{service_type}",
            "datacontenttype": "application/json",
            "time": time or datetime.now(UTC),
        },
        data,
    )
    return JSONFormat().write(event)


def nats_url_from_runtime(data_dir: Path) -> str:
    url = runtime_value(data_dir, "nats_url")
    if url is None:
        raise PublishError(
            f"no --nats-url given and no running `dcmstatus serve` found ({data_dir / 'runtime.json'}): "
            "start one first (it writes that file), or pass --nats-url"
        )
    return url


async def publish_event(
    nats_url: str, subject: str, body: bytes, security: NatsSecurity | None = None, timeout: float = 5.0
) -> int:
    """Publish through JetStream; return the stream sequence it was stored at."""
    where = redact_url(nats_url)
    try:
        nc = await open_connection(
            nats_url, security or NatsSecurity(), connect_timeout=timeout, max_reconnect_attempts=0, allow_reconnect=False
        )
    except AccessDenied as exc:
        raise PublishError(str(exc)) from None
    except Exception as exc:
        raise PublishError(f"cannot connect to NATS at {where}: {exc}. Is the server running?") from None
    try:
        ack = await nc.jetstream(timeout=timeout).publish(subject, body)
        return ack.seq
    except nats.errors.NoRespondersError:
        raise PublishError(
            f"no JetStream stream stores {subject}: start `dcmstatus serve` once (it creates the stream)"
        ) from None
    except nats.errors.TimeoutError:
        raise PublishError(f"NATS at {where} did not confirm the publish within {timeout:.0f}s") from None
    finally:
        await nc.close()


def publish(nats_url: str, subject: str, body: bytes, security: NatsSecurity | None = None) -> int:
    return asyncio.run(publish_event(nats_url, subject, body, security))

"""Today's catalog end to end through the decoder (docs/statuses.md): a
configured service type whose name has '-' (DCM's three-tier-app-demo) decodes
from its subject, and database events may report DELETING."""

from __future__ import annotations

import json

import pytest

from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import UNKNOWN_SERVICE_TYPE, UNKNOWN_STATUS, Rejection, StatusUpdate

STREAM_NS = 1_786_000_000_123_456_789
CATALOG = Catalog.default().merged(
    {"three-tier-app-demo": {"statuses": ["PENDING", "RUNNING", "FAILED", "DELETED"], "aliases": {"Up": "RUNNING"}}}
)
DECODER = Decoder(CATALOG)


def event(service_type: str, instance: str, status: str) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": "e-1", "source": f"dcm/providers/{service_type}-sp",
        "type": f"dcm.status.{service_type}", "subject": f"dcm.{service_type}", "time": "2026-05-01T10:00:00Z",
        "data": {"id": instance, "status": status, "message": "ok"},
    }).encode()  # fmt: skip


def test_a_hyphenated_type_decodes_from_its_subject():
    result = DECODER.decode("dcm.three-tier-app-demo", None, event("three-tier-app-demo", "app-1", "up"), 5, STREAM_NS)
    assert isinstance(result, StatusUpdate), result
    assert (result.service_type, result.instance_id, result.status) == ("three-tier-app-demo", "app-1", "RUNNING")


def test_a_rejection_names_the_configured_hyphenated_type():
    result = DECODER.decode("dcm.three-tier-app-demo", None, event("three-tier-app-demo", "app-1", "FLYING"), 5, STREAM_NS)
    assert isinstance(result, Rejection)
    assert (result.reason, result.service_type, result.instance_id) == (UNKNOWN_STATUS, "three-tier-app-demo", "app-1")


def test_an_unconfigured_hyphenated_type_is_unknown_and_not_named():
    result = Decoder().decode("dcm.three-tier-app-demo", None, event("three-tier-app-demo", "app-1", "RUNNING"), 5, STREAM_NS)
    assert isinstance(result, Rejection)
    assert (result.reason, result.service_type) == (UNKNOWN_SERVICE_TYPE, None)


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "FAILED", "UNKNOWN", "DELETING", "Deleting", "DELETED"])
def test_database_statuses_include_deleting(status):
    result = Decoder().decode("dcm.database", None, event("database", "db-1", status), 5, STREAM_NS)
    assert isinstance(result, StatusUpdate), result
    assert result.status == status.upper()

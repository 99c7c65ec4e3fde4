"""The options and rules for clustered servers (docs/reliability.md#clustered-servers):
--stream-replicas and its default from the server's INFO, and secrets in a
list of NATS URLs kept out of what is logged."""

import argparse

import pytest

from dcmstatus.adapters.nats.source import stream_replicas
from dcmstatus.config import ConfigError, add_serve_options, load_config
from dcmstatus.core.redaction import redact_url

_SINGLE = {"server_name": "n0", "jetstream": True}
_CLUSTER = {"server_name": "n0", "cluster": "dcm", "connect_urls": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}


def _load(argv: list[str]):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_options(parser)
    return load_config(parser.parse_args(argv), {})


def test_stream_replicas_default_follows_what_the_server_reports():
    assert stream_replicas(_SINGLE, None)[0] == 1
    replicas, why = stream_replicas(_CLUSTER, None)
    assert replicas == 3 and "'dcm'" in why and "3 servers" in why
    assert stream_replicas({}, None)[0] == 1  # nothing known: a single server


def test_stream_replicas_given_is_kept_on_a_cluster_and_refused_on_a_single_server():
    assert stream_replicas(_CLUSTER, 1) == (1, "--stream-replicas")
    assert stream_replicas(_CLUSTER, 5)[0] == 5  # the server judges placement
    assert stream_replicas(_SINGLE, 1)[0] == 1
    with pytest.raises(ConfigError, match="--stream-replicas 3: the NATS server is not part of a cluster"):
        stream_replicas(_SINGLE, 3)


@pytest.mark.parametrize("value", ["0", "6", "-1"])
def test_stream_replicas_out_of_range_is_a_configuration_error(value):
    with pytest.raises(ConfigError, match="--stream-replicas must be between 1 and 5"):
        _load(["--stream-replicas", value])


def test_stream_replicas_unset_by_default():
    config, _ = _load([])
    assert config.stream_replicas is None
    config, _ = _load(["--stream-replicas", "3"])
    assert config.stream_replicas == 3


def test_every_token_of_a_list_of_nats_urls_is_hidden():
    shown = redact_url("nats://tok1@127.0.0.1:4222,nats://tok2@127.0.0.1:4223, tls://user:pw@h:4224")
    assert "tok1" not in shown and "tok2" not in shown and "pw" not in shown
    assert shown == "nats://***@127.0.0.1:4222,nats://***@127.0.0.1:4223, tls://user:***@h:4224"


def test_a_multi_host_postgres_url_keeps_its_hosts_and_hides_the_password():
    shown = redact_url("postgresql://postgres:s3cret@h1:5432,h2:5433/db?target_session_attrs=read-write")
    assert shown == "postgresql://postgres:***@h1:5432,h2:5433/db?target_session_attrs=read-write"

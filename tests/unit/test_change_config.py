"""The options of change events on NATS (docs/changes.md#change-events-on-nats)."""

import argparse

import pytest

from dcmstatus.config import ConfigError, ServeConfig, add_serve_options, load_config


def parse(argv, env=None, tmp_path=None):
    parser = argparse.ArgumentParser()
    add_serve_options(parser)
    return load_config(parser.parse_args(argv), env or {})[0]


@pytest.mark.parametrize(("subjects", "prefix"), [("dcm.>", "dcm.changes"), (">", "dcmstatus.changes"), ("dcm.*", "dcm")])
def test_a_prefix_the_subjects_filter_captures_is_refused(subjects, prefix):
    with pytest.raises(ConfigError, match="captures change events"):
        parse(["--subjects", subjects, "--changes-subject-prefix", prefix])


@pytest.mark.parametrize("prefix", ["", "a..b", "changes.*", "changes.>", "has space", ".lead"])
def test_a_prefix_that_is_no_literal_subject_is_refused(prefix):
    with pytest.raises(ConfigError, match="not a literal NATS subject"):
        parse(["--changes-subject-prefix", prefix])


def test_the_defaults_publish_outside_the_dcm_filter():
    config = parse([])
    assert (config.no_change_events, config.changes_subject_prefix, config.changes_stream) == (
        False, "dcmstatus.changes", "dcmstatus-changes",
    )
    assert config.changes_retention == 7 * 24 * 3600


def test_no_change_events_from_flag_env_and_file(tmp_path):
    assert parse(["--no-change-events"]).no_change_events is True
    assert parse([], {"DCMSTATUS_NO_CHANGE_EVENTS": "true"}).no_change_events is True
    assert parse([], {"DCMSTATUS_NO_CHANGE_EVENTS": "0"}).no_change_events is False
    with pytest.raises(ConfigError, match="true or false"):
        parse([], {"DCMSTATUS_NO_CHANGE_EVENTS": "maybe"})
    file = tmp_path / "c.toml"
    file.write_text("no_change_events = true\n")
    assert parse(["--config", str(file)]).no_change_events is True
    file.write_text('no_change_events = "yes"\n')
    with pytest.raises(ConfigError, match="true or false"):
        parse(["--config", str(file)])


def test_retention_must_be_positive():
    with pytest.raises(ConfigError, match="--changes-retention must be positive"):
        parse(["--changes-retention", "0"])
    assert ServeConfig().changes_retention > 0

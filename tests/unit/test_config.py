"""Configuration: flag > environment > TOML file > default, strict file keys,
service types from the file, the API token, and `dcmstatus config`."""

import argparse
import json
import tomllib
from pathlib import Path

import pytest

import dcmstatus.cli.commands as cli
from dcmstatus.config import ConfigError, ServeConfig, add_serve_options, load_config, render_toml


def _load(argv: list[str], env: dict[str, str] | None = None):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_options(parser)
    return load_config(parser.parse_args(argv), env or {})


@pytest.fixture
def toml(tmp_path: Path):
    def write(text: str) -> str:
        path = tmp_path / "dcmstatus.toml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults():
    config, sources = _load([])
    assert config == ServeConfig()
    assert set(sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(toml):
    path = toml('http_port = 7000\nwriters = 3\nbatch_size = 500\nlog_level = "debug"\n')
    env = {"DCMSTATUS_HTTP_PORT": "7001", "DCMSTATUS_WRITERS": "4"}
    config, sources = _load(["--config", path, "--http-port", "7002"], env)
    assert (config.http_port, config.writers, config.batch_size, config.log_level) == (7002, 4, 500, "DEBUG")
    assert config.max_in_flight == 10_000  # default
    assert sources["http_port"] == "flag"
    assert sources["writers"] == "env DCMSTATUS_WRITERS"
    assert sources["batch_size"] == f"file {path}"
    assert sources["max_in_flight"] == "default"

    # The config file may also be named by the environment.
    config, _ = _load([], {"DCMSTATUS_CONFIG": path})
    assert config.http_port == 7000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http_prot = 1\n", "unknown key 'http_prot'; did you mean 'http_port'?"),
        ("zzz = 1\n", "unknown key 'zzz' (known: role, nats_url,"),
        ("http_port = '80'\n", "http_port must be an integer"),
        ("http_port = true\n", "http_port must be an integer"),
        ("ack_wait = 'soon'\n", "ack_wait must be a number"),
        ("log_format = 'xml'\n", "log_format must be one of text, json"),
        ("http_port = \n", "is not valid TOML"),
        ("writers = 0\n", "--writers must be at least 1"),
        ("[service_types.vm]\ncolour = 'red'\n", "service_types.vm.colour: unknown key"),
        ("[service_types.vm.aliases]\nUp = 'FLYING'\n", "service_types.vm.aliases.Up: target 'FLYING' is not a vm status"),
        ("[service_types.toaster]\naliases = {}\n", "service_types.toaster.statuses: must not be empty"),
    ],
)
def test_file_errors_name_the_key(toml, text, message):
    with pytest.raises(ConfigError) as caught:
        _load(["--config", toml(text)])
    assert message in str(caught.value)


def test_env_errors_name_the_variable():
    with pytest.raises(ConfigError, match=r"DCMSTATUS_HTTP_PORT='eighty' is not an integer"):
        _load([], {"DCMSTATUS_HTTP_PORT": "eighty"})
    with pytest.raises(ConfigError, match="DCMSTATUS_LOG_FORMAT='yaml' must be one of text, json"):
        _load([], {"DCMSTATUS_LOG_FORMAT": "yaml"})
    with pytest.raises(ConfigError, match="cannot read config file /nonexistent.toml"):
        _load([], {"DCMSTATUS_CONFIG": "/nonexistent.toml"})


def test_service_types_from_the_file_are_merged_into_the_catalog(toml):
    path = toml(
        "[service_types.three_tier_app]\n"
        'statuses = ["PENDING", "READY", "FAILED"]\n'
        'aliases = { Up = "READY" }\n'
        "[service_types.vm.aliases]\n"
        'Booting = "PROVISIONING"\n'
    )
    config, _ = _load(["--config", path])
    catalog = config.catalog()
    assert catalog.canonical_status("three_tier_app", " up ") == "READY"
    assert catalog.canonical_status("vm", "booting") == "PROVISIONING"
    assert catalog.canonical_status("vm", "Pending") == "PROVISIONING"  # defaults kept
    assert "container" in catalog


def test_api_token_from_env_or_file(tmp_path, toml):
    config, sources = _load([], {"DCMSTATUS_API_TOKEN": "t0k"})
    assert config.api_token == "t0k" and sources["api_token"] == "env DCMSTATUS_API_TOKEN"

    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    config, sources = _load(["--api-token-file", str(token_file)])
    assert config.api_token == "from-file" and sources["api_token"] == f"file {token_file}"

    with pytest.raises(ConfigError, match="keep one"):
        _load(["--api-token-file", str(token_file)], {"DCMSTATUS_API_TOKEN": "t0k"})
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        _load(["--api-token-file", str(token_file)])
    with pytest.raises(ConfigError, match="cannot read the API token file"):
        _load(["--api-token-file", str(tmp_path / "missing")])
    # Never a flag: it would show in the process list.
    with pytest.raises(SystemExit):
        _load(["--api-token", "x"])


def test_api_token_from_env_is_stripped_as_from_a_file(tmp_path):
    # `export DCMSTATUS_API_TOKEN="$(cat token)"` or a secret mount with a
    # newline: the token is the same as the file variant's.
    config, _ = _load([], {"DCMSTATUS_API_TOKEN": "  t0k\n"})
    assert config.api_token == "t0k"
    with pytest.raises(ConfigError, match="the API token is empty"):
        _load([], {"DCMSTATUS_API_TOKEN": " \n"})


SECRET = "a-page-token-secret-0123456789"


def test_page_token_secret_from_env_config_file_or_secret_file(tmp_path, toml):
    config, sources = _load([])
    assert (config.page_token_secret, config.page_token_secret_file) == (None, None)

    config, sources = _load([], {"DCMSTATUS_PAGE_TOKEN_SECRET": f" {SECRET}\n"})
    assert config.page_token_secret == SECRET and sources["page_token_secret"] == "env DCMSTATUS_PAGE_TOKEN_SECRET"
    config, sources = _load(["--config", toml(f'page_token_secret = "{SECRET}"\n')])
    assert config.page_token_secret == SECRET

    secret_file = tmp_path / "page-secret"
    secret_file.write_text(SECRET + "\n")
    for argv, env in ((["--page-token-secret-file", str(secret_file)], {}), ([], {"DCMSTATUS_PAGE_TOKEN_SECRET_FILE": str(secret_file)})):
        config, sources = _load(argv, env)
        assert config.page_token_secret == SECRET and sources["page_token_secret"] == f"file {secret_file}"

    with pytest.raises(ConfigError, match="keep one"):
        _load(["--page-token-secret-file", str(secret_file)], {"DCMSTATUS_PAGE_TOKEN_SECRET": SECRET})
    with pytest.raises(ConfigError, match="cannot read the page token secret file"):
        _load(["--page-token-secret-file", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        _load([], {"DCMSTATUS_PAGE_TOKEN_SECRET": "short"})
    # Never a flag: it would show in the process list.
    with pytest.raises(SystemExit):
        _load(["--page-token-secret", SECRET])


def test_page_token_secret_is_redacted(capsys, monkeypatch):
    config, sources = _load([], {"DCMSTATUS_PAGE_TOKEN_SECRET": SECRET})
    assert SECRET not in render_toml(config, sources)
    assert "# page_token_secret = '***' (env DCMSTATUS_PAGE_TOKEN_SECRET; redacted)" in render_toml(config, sources)
    assert config.redacted()["page_token_secret"] == "***"
    monkeypatch.setenv("DCMSTATUS_PAGE_TOKEN_SECRET", SECRET)
    assert cli.main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and json.loads(out)["page_token_secret"] == "***"


def test_rendered_config_is_a_valid_config_file_with_secrets_redacted(toml, tmp_path):
    path = toml('database_url = "postgresql://app:hunter2@db/dcm"\nnats_url = "nats://s3cr3t@nats:4222"\n'
                "[service_types.app]\nstatuses = ['UP']\n")
    config, sources = _load(["--config", path], {"DCMSTATUS_API_TOKEN": "tok3n"})
    text = render_toml(config, sources)
    for secret in ("hunter2", "s3cr3t", "tok3n"):
        assert secret not in text
    assert 'database_url = "postgresql://app:***@db/dcm"' in text
    assert "# api_token = '***' (env DCMSTATUS_API_TOKEN; redacted)" in text

    reloaded_path = tmp_path / "again.toml"
    reloaded_path.write_text(text)
    assert tomllib.loads(text)["service_types"]["app"] == {"statuses": ["UP"]}
    again, _ = _load(["--config", str(reloaded_path)], {"DCMSTATUS_API_TOKEN": "tok3n"})
    plain = {k: v for k, v in config.redacted().items() if k not in ("database_url", "nats_url")}
    assert {k: v for k, v in again.redacted().items() if k in plain} == plain
    assert again.catalog() == config.catalog()


def test_config_command(capsys, toml, monkeypatch):
    monkeypatch.setenv("DCMSTATUS_API_TOKEN", "tok3n")
    assert cli.main(["config", "--config", toml("http_port = 9999\n"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["http_port"] == 9999 and out["api_token"] == "***"
    assert out["service_types"]["vm"]["aliases"]["Succeeded"] == "STOPPED"

    assert cli.main(["config", "--config", toml("http_port = 'x'\n")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcmstatus config: config file ") and "http_port must be an integer" in err


def test_help_names_env_variables_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("[env DCMSTATUS_HTTP_PORT; default 8080]", "DCMSTATUS_CONFIG", "--log-format {text,json}",
                     "[env DCMSTATUS_API_TOKEN_FILE; default none]"):
        assert expected in text


def test_stall_timeout_is_an_option_and_reaches_the_nats_source():
    from dcmstatus.core.catalog import Catalog
    from dcmstatus.service import Service

    config, sources = _load([], {"DCMSTATUS_STALL_TIMEOUT": "12.5"})
    assert config.stall_timeout == 12.5 and sources["stall_timeout"] == "env DCMSTATUS_STALL_TIMEOUT"
    assert _load(["--stall-timeout", "45"])[0].stall_timeout == 45.0
    assert ServeConfig().stall_timeout == 30.0
    with pytest.raises(ConfigError, match="--stall-timeout must be positive"):
        _load(["--stall-timeout", "0"])
    service = Service(config, "nats://127.0.0.1:1", "postgresql://127.0.0.1:1/x", Catalog.default(), b"k" * 32)
    assert service.source.settings.stall_timeout == 12.5


def test_max_clock_skew_default_env_flag_and_file(toml):
    assert _load([])[0].max_clock_skew == 300.0
    config, sources = _load([], {"DCMSTATUS_MAX_CLOCK_SKEW": "60"})
    assert config.max_clock_skew == 60.0 and sources["max_clock_skew"] == "env DCMSTATUS_MAX_CLOCK_SKEW"
    assert _load(["--max-clock-skew", "0.5"])[0].max_clock_skew == 0.5
    assert _load(["--config", toml("max_clock_skew = 120\n")])[0].max_clock_skew == 120.0


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "86401"])
def test_max_clock_skew_must_be_positive_and_at_most_a_day(value):
    with pytest.raises(ConfigError, match=r"--max-clock-skew must be more than 0 and at most 86400 seconds"):
        _load(["--max-clock-skew", value])
    with pytest.raises(ConfigError, match="--max-clock-skew must be more than 0"):
        _load([], {"DCMSTATUS_MAX_CLOCK_SKEW": value})


def test_a_hyphenated_service_type_from_the_file_round_trips(toml, tmp_path):
    path = toml('[service_types.three-tier-app-demo]\nstatuses = ["PENDING", "RUNNING"]\n')
    config, sources = _load(["--config", path])
    assert config.catalog().canonical_status("three-tier-app-demo", "running") == "RUNNING"
    text = render_toml(config, sources)
    assert "[service_types.three-tier-app-demo]" in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    assert _load(["--config", str(again)])[0].catalog() == config.catalog()
    with pytest.raises(ConfigError, match=r"service_types\.'three\.tier': a service type name is lower-case"):
        _load(["--config", toml('[service_types."three.tier"]\nstatuses = ["UP"]\n')])


# --- roles (docs/operations.md#roles) ------------------------------------------


def test_role_defaults_to_all_and_comes_from_env_or_file(toml):
    assert _load([])[0].role == "all"
    url = {"DCMSTATUS_NATS_URL": "nats://n:4222", "DCMSTATUS_DATABASE_URL": "postgresql://db/x"}
    assert _load([], {**url, "DCMSTATUS_ROLE": "Consumer"})[0].role == "consumer"
    path = toml("role = 'api'\ndatabase_url = 'postgresql://db/x'\n")
    config, sources = _load(["--config", path])
    assert config.role == "api" and sources["role"] == f"file {path}"
    with pytest.raises(ConfigError, match="DCMSTATUS_ROLE='both'"):
        _load([], {"DCMSTATUS_ROLE": "both"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--role", "consumer"], "--role consumer needs --nats-url and --database-url"),
        (["--role", "consumer", "--database-url", "postgresql://db/x"], "--role consumer needs --nats-url"),
        (["--role", "api"], "--role api needs --database-url"),
        (["--role", "api", "--nats-url", "nats://n:4222"], "--role api needs --database-url"),
    ],
)
def test_a_role_needs_its_servers(argv, message):
    with pytest.raises(ConfigError, match=message):
        _load(argv)


def test_an_api_replica_needs_no_nats_url():
    config, _ = _load(["--role", "api", "--database-url", "postgresql://db/x"])
    assert config.nats_url is None and not config.embedded
    assert config.runs("api") and not config.runs("consumer")


def test_options_of_the_other_role_are_named_with_their_source(tmp_path, toml):
    token = tmp_path / "token"
    token.write_text("a-token\n")
    path = toml("writers = 4\nmax_watch_streams = 5\n")
    argv = ["--config", path, "--database-url", "postgresql://db/x", "--nats-url", "nats://n:4222",
            "--api-token-file", str(token)]  # fmt: skip
    api, sources = _load([*argv, "--role", "api"], {"DCMSTATUS_STREAM": "s"})
    assert api.unused_options(sources) == ["--nats-url (flag)", "--stream (env DCMSTATUS_STREAM)", f"--writers (file {path})"]
    consumer, sources = _load([*argv, "--role", "consumer"])
    # The token read from its file is named once, by the option that named the file.
    assert consumer.unused_options(sources) == [f"--max-watch-streams (file {path})", "--api-token-file (flag)"]
    everything, sources = _load(argv)
    assert everything.unused_options(sources) == []


def test_every_nats_and_intake_option_belongs_to_the_consumer():
    # A new NATS option that forgets its role would be "used" by an api
    # replica, which never connects to NATS: no warning would say otherwise.
    from dataclasses import fields

    roles = {f.name: f.metadata.get("role") for f in fields(ServeConfig)}
    nats_options = [n for n in roles if n.startswith(("nats_", "stream", "changes_")) and n != "nats_port"]
    assert nats_options and all(roles[n] == "consumer" for n in nats_options), roles
    assert roles["api_token"] == roles["page_token_secret"] == roles["max_watch_streams"] == "api"
    assert roles["database_url"] is None and roles["role"] is None

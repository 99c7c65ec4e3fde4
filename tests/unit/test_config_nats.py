"""The options of a secured NATS connection: one declaration each (flag,
DCMSTATUS_* variable, config key), secrets only from files or the
environment, a missing or unusable file named at start-up (exit 2), secrets
redacted by `dcmstatus config`, and the same options on `dcmstatus publish`."""

import argparse
import json
from pathlib import Path

import pytest
import trustme

import dcmstatus.cli.commands as cli
from dcmstatus.config import NATS_OPTIONS, ConfigError, add_serve_options, env_name, load_config, render_toml

URLS = ["--nats-url", "nats://nats.example:4222", "--database-url", "postgresql://db.example/dcm"]


def _load(argv: list[str], env: dict[str, str] | None = None, only=None):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_serve_options(parser, only=only)
    return load_config(parser.parse_args(argv), env or {}, only=only)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ca = trustme.CA()
    client = ca.issue_cert("dcmstatus@example.test")
    paths = {
        "ca": tmp_path / "ca.pem",
        "cert": tmp_path / "client.pem",
        "key": tmp_path / "client.key",
        "token": tmp_path / "token",
        "password": tmp_path / "password",
        "seed": tmp_path / "user.nk",
        "creds": tmp_path / "user.creds",
        "not_pem": tmp_path / "not.pem",
    }
    ca.cert_pem.write_to_path(paths["ca"])
    client.cert_chain_pems[0].write_to_path(paths["cert"])
    client.private_key_pem.write_to_path(paths["key"])
    paths["token"].write_text("t0ken-from-file\n")
    paths["password"].write_text("pa55-from-file\n")
    paths["seed"].write_text("SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n")
    paths["creds"].write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.c2ln\n------END NATS USER JWT------\n"
        "-----BEGIN USER NKEY SEED-----\nSUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU\n------END USER NKEY SEED------\n"
    )
    paths["not_pem"].write_text("not a certificate\n")
    return paths


def test_each_option_has_a_flag_a_variable_and_a_config_key(files, tmp_path):
    config, sources = _load([*URLS, "--nats-tls-ca", str(files["ca"]), "--nats-token-file", str(files["token"])])
    assert config.nats_tls_ca == files["ca"] and config.nats_token == "t0ken-from-file"
    assert sources["nats_token"] == f"file {files['token']}"

    env = {"DCMSTATUS_NATS_TLS_CERT": str(files["cert"]), "DCMSTATUS_NATS_TLS_KEY": str(files["key"]),
           "DCMSTATUS_NATS_USER": "dcm", "DCMSTATUS_NATS_PASSWORD": "pa55-from-env"}
    config, sources = _load(URLS, env)
    assert (config.nats_tls_cert, config.nats_tls_key) == (files["cert"], files["key"])
    assert (config.nats_user, config.nats_password) == ("dcm", "pa55-from-env")
    assert sources["nats_password"] == "env DCMSTATUS_NATS_PASSWORD"

    toml = tmp_path / "c.toml"
    toml.write_text(f'nats_creds = "{files["creds"]}"\nnats_tls_ca = "{files["ca"]}"\n')
    config, sources = _load([*URLS, "--config", str(toml)])
    assert config.nats_creds == files["creds"] and sources["nats_creds"] == f"file {toml}"
    security = config.nats_security()
    assert security.tls and security.connect_options()["user_credentials"] == str(files["creds"])


@pytest.mark.parametrize("secret", ["password", "token"])
def test_secrets_themselves_are_never_a_flag_nor_a_config_key(secret, tmp_path):
    with pytest.raises(SystemExit):
        _load([*URLS, f"--nats-{secret}", "x"])
    toml = tmp_path / "c.toml"
    toml.write_text(f'nats_{secret} = "x"\n')
    with pytest.raises(ConfigError, match=f"nats_{secret} cannot be kept in a config file; use nats_{secret}_file"):
        _load([*URLS, "--config", str(toml)])


@pytest.mark.parametrize(
    "option", ["--nats-creds", "--nats-nkey-seed", "--nats-password-file", "--nats-token-file", "--nats-tls-ca",
               "--nats-tls-cert"],
)
def test_a_missing_file_is_an_error_naming_the_option(option, tmp_path):
    extra = ["--nats-user", "dcm"] if option == "--nats-password-file" else []
    with pytest.raises(ConfigError, match=f"^{option}: cannot read {tmp_path}/missing"):
        _load([*URLS, *extra, option, str(tmp_path / "missing")])


def test_files_that_are_not_what_the_option_wants_are_named(files):
    with pytest.raises(ConfigError, match="--nats-creds: .* is not a NATS credentials file"):
        _load([*URLS, "--nats-creds", str(files["token"])])
    with pytest.raises(ConfigError, match="--nats-nkey-seed: .* does not hold a user nkey seed"):
        _load([*URLS, "--nats-nkey-seed", str(files["token"])])
    with pytest.raises(ConfigError, match="--nats-tls-ca: cannot use these TLS files"):
        _load([*URLS, "--nats-tls-ca", str(files["not_pem"])])
    with pytest.raises(ConfigError, match="--nats-tls-cert, --nats-tls-key: cannot use these TLS files"):
        _load([*URLS, "--nats-tls-cert", str(files["cert"]), "--nats-tls-key", str(files["ca"])])
    files["token"].write_text("\n")
    with pytest.raises(ConfigError, match="--nats-token-file: .* is empty"):
        _load([*URLS, "--nats-token-file", str(files["token"])])


def test_combinations_that_cannot_work_are_refused(files):
    with pytest.raises(ConfigError, match="--nats-user needs a password"):
        _load([*URLS, "--nats-user", "dcm"])
    with pytest.raises(ConfigError, match="a NATS password is set but --nats-user is not"):
        _load(URLS, {"DCMSTATUS_NATS_PASSWORD": "x"})
    with pytest.raises(ConfigError, match="--nats-creds and a NATS token are both set"):
        _load([*URLS, "--nats-creds", str(files["creds"])], {"DCMSTATUS_NATS_TOKEN": "x"})
    with pytest.raises(ConfigError, match="both DCMSTATUS_NATS_TOKEN and --nats-token-file .* keep one"):
        _load([*URLS, "--nats-token-file", str(files["token"])], {"DCMSTATUS_NATS_TOKEN": "x"})
    with pytest.raises(ConfigError, match="--nats-tls-key is set but --nats-tls-cert is not"):
        _load([*URLS, "--nats-tls-key", str(files["key"])])
    # The embedded nats-server has its own token; these would be ignored.
    with pytest.raises(ConfigError, match="--nats-tls-ca is for a NATS server given with --nats-url"):
        _load(["--nats-tls-ca", str(files["ca"])])
    with pytest.raises(ConfigError, match="DCMSTATUS_NATS_TOKEN is for a NATS server given with --nats-url"):
        _load([], {"DCMSTATUS_NATS_TOKEN": "x"})


def test_a_tls_url_turns_tls_on():
    config, _ = _load(["--nats-url", "tls://nats.example:4222", "--database-url", "postgresql://db.example/dcm"])
    assert config.nats_security().tls and "tls" in config.nats_security().connect_options()
    config, _ = _load(URLS)
    assert not config.nats_security().tls and config.nats_security().connect_options() == {}


def test_secrets_are_redacted_by_dcmstatus_config(files, capsys, monkeypatch):
    monkeypatch.setenv("DCMSTATUS_NATS_USER", "dcm")
    monkeypatch.setenv("DCMSTATUS_NATS_PASSWORD", "pa55-from-env")
    config, sources = _load(URLS, {"DCMSTATUS_NATS_USER": "dcm", "DCMSTATUS_NATS_PASSWORD": "pa55-from-env"})
    text = render_toml(config, sources)
    assert "pa55-from-env" not in text
    assert "# nats_password = '***' (env DCMSTATUS_NATS_PASSWORD; redacted)" in text
    assert "pa55-from-env" not in repr(config.nats_security())

    assert cli.main(["config", *URLS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nats_password"] == "***" and out["nats_user"] == "dcm"

    monkeypatch.delenv("DCMSTATUS_NATS_USER")
    monkeypatch.delenv("DCMSTATUS_NATS_PASSWORD")
    assert cli.main(["config", *URLS, "--nats-token-file", str(files["token"])]) == 0
    out = capsys.readouterr().out
    assert "t0ken-from-file" not in out and f"# nats_token = '***' (file {files['token']}; redacted)" in out


def test_serve_and_publish_exit_2_naming_the_option(tmp_path, capsys):
    missing = str(tmp_path / "missing.creds")
    assert cli.main(["serve", *URLS, "--nats-creds", missing]) == 2
    assert f"dcmstatus serve: --nats-creds: cannot read {missing}" in capsys.readouterr().err
    argv = ["publish", "--service-type", "vm", "--instance", "vm1", "--status", "RUNNING"]
    assert cli.main([*argv, "--nats-url", "nats://127.0.0.1:9", "--nats-creds", missing]) == 2
    assert f"dcmstatus publish: --nats-creds: cannot read {missing}" in capsys.readouterr().err


def test_publish_takes_the_nats_options_of_serve(capsys):
    with pytest.raises(SystemExit):
        cli.main(["publish", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in NATS_OPTIONS:
        if option in ("nats_password", "nats_token"):
            assert "--" + option.replace("_", "-") + " " not in text
        else:
            assert f"--{option.replace('_', '-')}" in text and f"[env {env_name(option)};" in text
    # Abbreviations stay off: "--nats-token" must not quietly mean --nats-token-file.
    with pytest.raises(SystemExit):
        cli.main(["publish", "--service-type", "vm", "--instance", "i", "--status", "S", "--nats-token", "x"])

"""Page tokens (adapters/http/page_tokens.py) and where their secret comes
from (service.page_token_secret): tokens verify only under the secret they
were made with; the generated secret file is private, atomic and reused."""

import os
import stat
import threading
from pathlib import Path

import pytest

from dcmstatus.adapters.http.page_tokens import InstanceCursor, PageTokens, RejectedCursor, load_or_create_secret
from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.config import ServeConfig
from dcmstatus.core.errors import ConfigError
from dcmstatus.service import PAGE_TOKEN_KEY_FILE, page_token_secret

CURSOR = InstanceCursor("vm-7", "vm", "RUNNING", None)


def test_a_token_verifies_under_its_own_secret_only():
    one, two = PageTokens(b"secret one"), PageTokens(b"secret two")
    token = one.encode(CURSOR)
    assert one.decode(token) == CURSOR
    assert PageTokens(b"secret one").decode(token) == CURSOR  # same secret, another process
    with pytest.raises(HTTPProblem) as refused:
        two.decode(token)
    assert refused.value.status == 400
    assert two.decode(two.encode(RejectedCursor(5, None))) == RejectedCursor(5, None)


def test_an_empty_secret_is_refused():
    with pytest.raises(ValueError):
        PageTokens(b"")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secret_file_is_made_private_and_reused(tmp_path):
    path = tmp_path / "data" / "page-token.key"
    old_umask = os.umask(0)  # even a permissive umask gives no one else access
    try:
        secret = load_or_create_secret(path)
    finally:
        os.umask(old_umask)
    assert len(secret) >= 32
    assert _mode(path) == 0o600
    assert path.read_bytes().strip() == secret
    assert load_or_create_secret(path) == secret  # a restart reuses it
    assert sorted(p.name for p in path.parent.iterdir()) == ["page-token.key"]  # no temporary left
    assert load_or_create_secret(tmp_path / "elsewhere.key") != secret


def test_secret_file_racing_makers_agree(tmp_path):
    path = tmp_path / "page-token.key"
    results: list[bytes] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait()
        results.append(load_or_create_secret(path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page-token.key"]


def test_secret_file_that_is_empty_or_unreadable_is_a_config_error(tmp_path):
    path = tmp_path / "page-token.key"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_or_create_secret(path)
    with pytest.raises(ConfigError, match="cannot read the page token secret"):
        load_or_create_secret(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="cannot read the page token secret"):
        load_or_create_secret(path / "below-a-file.key")


def test_service_uses_the_configured_secret_or_the_data_dir_file(tmp_path):
    configured = ServeConfig(data_dir=tmp_path, page_token_secret="configured-secret-0123")
    assert page_token_secret(configured) == b"configured-secret-0123"
    assert not (tmp_path / PAGE_TOKEN_KEY_FILE).exists()

    generated = page_token_secret(ServeConfig(data_dir=tmp_path))
    assert (tmp_path / PAGE_TOKEN_KEY_FILE).read_bytes().strip() == generated
    assert page_token_secret(ServeConfig(data_dir=tmp_path)) == generated

"""The status writer's parameters (adapters/postgres/writer.py): its text[]
arrays, built in PostgreSQL's binary form by the writer itself, are byte for
byte what psycopg's own list dumper sends, and what psycopg would refuse the
writer refuses too (a ValueError: the batch is refused, its event isolated)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.adapt import PyFormat, Transformer

from dcmstatus.adapters.postgres import writer

TX = Transformer()


def psycopg_bytes(values: list[str | None]) -> bytes:
    return bytes(TX.get_dumper(values, PyFormat.BINARY).dump(values))


texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.none() | texts | st.sampled_from(["RUNNING", "vm", "é", "🚀", ""]), min_size=1, max_size=40))
def test_text_arrays_are_what_psycopg_sends(values):
    if all(v is None for v in values):
        values = [*values, "x"]  # psycopg needs one value to know the element type
    assert writer._text_array(values).data == psycopg_bytes(values)
    cache: dict = {}
    assert writer._text_array(values, cache).data == psycopg_bytes(values)
    assert writer._text_array(values, cache).data == psycopg_bytes(values), "the cached elements differ"


def test_the_cache_of_repeated_values_stays_bounded(monkeypatch):
    monkeypatch.setattr(writer, "_REPEATED_LIMIT", 5)
    cache: dict = {}
    for n in range(20):
        writer._text_array([f"message {n}"], cache)
        assert len(cache) <= 6


def test_text_psycopg_cannot_send_is_refused_as_a_value_error():
    with pytest.raises(ValueError):
        psycopg_bytes(["\ud800"])
    with pytest.raises(ValueError):
        writer._text_array(["ok", "\ud800"])
    with pytest.raises(ValueError):
        writer._text_array(["\ud800"], {})

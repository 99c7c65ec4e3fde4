"""The service-type catalog: which service types exist, their canonical
statuses and the aliases providers report instead (docs/statuses.md).

This is configuration, not code: `Catalog.default()` is the default table,
`Catalog.from_mapping()` reads the same shape from a plain dict (e.g. a TOML
table) and `Catalog.merged()` lets an operator add a type or an alias on top
of the defaults. A catalog is immutable once built; every lookup the hot path
needs is precomputed at construction.

Mapping shape (one entry per service type)::

    {"vm": {"statuses": ["PROVISIONING", "RUNNING", ...],
            "aliases": {"Pending": "PROVISIONING", ...}}}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import msgspec

__all__ = ["Catalog", "ServiceType"]

# A service type is the last token of a NATS subject (DCM's own names use
# '-', e.g. three-tier-app-demo) and is stored, logged and filtered on: keep it
# to lower-case letters, digits, '_' and '-', nothing a subject, a TOML bare
# key or a log line would split on (docs/statuses.md#adding-a-service-type-or-an-alias).
_TYPE_NAME_RE: Final = re.compile(r"[a-z0-9_-]+")
_TYPE_NAME_RULE: Final = "lower-case letters, digits, '_' and '-' (e.g. three-tier-app-demo)"
# Statuses are stored upper case; allowing '-' keeps names like IN-PROGRESS
# possible without admitting spaces or punctuation that would be ambiguous
# after trimming.
_STATUS_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ENTRY_KEYS: Final = frozenset({"statuses", "aliases"})


class ServiceType(msgspec.Struct, frozen=True):
    """One service type: canonical statuses (upper case) and aliases.

    `aliases` maps a reported spelling (any case) to one of `statuses`.
    Treat it as read-only: the catalog precomputes lookups from it.
    """

    name: str
    statuses: tuple[str, ...]
    aliases: dict[str, str] = {}


_DEFAULT_TYPES: Final = (
    ServiceType(
        "vm",
        ("PROVISIONING", "RUNNING", "STOPPING", "STOPPED", "PAUSED", "FAILED", "DELETING", "DELETED"),
        # KubeVirt VM phases (docs/statuses.md#aliases).
        {
            "Pending": "PROVISIONING",
            "Scheduling": "PROVISIONING",
            "Scheduled": "PROVISIONING",
            "Succeeded": "STOPPED",
            "Terminating": "DELETING",
        },
    ),
    ServiceType("container", ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "UNKNOWN", "DELETED")),
    ServiceType("storage", ("PROVISIONING", "RUNNING", "FAILED", "DELETING", "DELETED")),
    ServiceType("network", ("PENDING", "READY", "DELETED")),
    ServiceType(
        "cluster",
        ("PROGRESSING", "ACTIVE", "DEGRADED", "UNAVAILABLE", "FAILED", "DELETING", "DELETED"),
        # ACM cluster SP (docs/statuses.md#aliases).
        {"PENDING": "PROGRESSING", "PROVISIONING": "PROGRESSING", "READY": "ACTIVE"},
    ),
    ServiceType("database", ("PENDING", "RUNNING", "FAILED", "UNKNOWN", "DELETING", "DELETED")),
)


class Catalog:
    """An immutable set of service types with precomputed status lookups."""

    __slots__ = ("_lookups", "_types")

    def __init__(self, service_types: Iterable[ServiceType]) -> None:
        types: dict[str, ServiceType] = {}
        lookups: dict[str, dict[str, str]] = {}
        for st in service_types:
            if not isinstance(st, ServiceType):
                raise TypeError(f"expected ServiceType, got {type(st).__name__}")
            if st.name in types:
                raise ValueError(f"{st.name}: service type defined twice")
            canonical, lookup = _build_lookup(st)
            # Store a normalised copy so the catalog never shares mutable state.
            types[st.name] = ServiceType(st.name, canonical, dict(st.aliases))
            lookups[st.name] = lookup
        self._types = types
        self._lookups = lookups

    # -- construction -------------------------------------------------------

    @classmethod
    def default(cls) -> Catalog:
        """The six built-in service types and their aliases (docs/statuses.md#the-built-in-catalog)."""
        return cls(_DEFAULT_TYPES)

    @classmethod
    def from_mapping(cls, obj: Mapping[str, Any]) -> Catalog:
        """Build a catalog from `{type: {"statuses": [...], "aliases": {...}}}`.

        Raises ValueError naming the offending key on any invalid entry.
        """
        return cls(_parse_mapping(obj, base=None))

    def merged(self, obj: Mapping[str, Any]) -> Catalog:
        """A new catalog: this one plus the types and aliases in `obj`.

        A type not yet known is added (it needs `statuses`). For a known type,
        listed `statuses` are appended to the existing ones and `aliases` are
        added, replacing an existing alias of the same spelling. Nothing is
        ever removed, so an operator's addition cannot drop a default by
        accident.
        """
        return Catalog(_parse_mapping(obj, base=self._types))

    # -- queries --------------------------------------------------------------

    def status_lookup(self, service_type: str) -> dict[str, str] | None:
        """`{reported.strip().lower(): CANONICAL}` for a type, None if unknown.

        Contains every canonical status and every alias. The dict is shared:
        do not modify it.
        """
        return self._lookups.get(service_type)

    def canonical_status(self, service_type: str, reported: str) -> str | None:
        """The canonical status for a reported one, or None (convenience)."""
        lookup = self._lookups.get(service_type)
        if lookup is None:
            return None
        return lookup.get(reported.strip().lower())

    def service_types(self) -> tuple[str, ...]:
        """Names of all service types, in definition order."""
        return tuple(self._types)

    def statuses(self, service_type: str) -> tuple[str, ...]:
        """Canonical statuses of a type; KeyError if the type is unknown."""
        return self._types[service_type].statuses

    def get(self, service_type: str) -> ServiceType | None:
        return self._types.get(service_type)

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        """The inverse of `from_mapping` (for showing the effective config)."""
        return {
            st.name: {"statuses": list(st.statuses), "aliases": dict(st.aliases)}
            for st in self._types.values()
        }

    def __contains__(self, service_type: object) -> bool:
        return service_type in self._types

    def __iter__(self) -> Iterator[ServiceType]:
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Catalog):
            return NotImplemented
        return self._types == other._types

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Catalog({list(self._types)!r})"


def _build_lookup(st: ServiceType) -> tuple[tuple[str, ...], dict[str, str]]:
    """Validate one service type; return its canonical statuses and lookup."""
    name = st.name
    if not isinstance(name, str) or not _TYPE_NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r}: a service type name is {_TYPE_NAME_RULE}")
    if not st.statuses:
        raise ValueError(f"{name}.statuses: must not be empty")
    canonical: list[str] = []
    lookup: dict[str, str] = {}
    for status in st.statuses:
        if not isinstance(status, str) or not _STATUS_RE.fullmatch(status):
            raise ValueError(
                f"{name}.statuses: {status!r} is not a status name (letters, digits, '_', '-')"
            )
        upper = status.upper()
        if upper.lower() in lookup:
            raise ValueError(f"{name}.statuses: {status!r} is listed twice")
        canonical.append(upper)
        lookup[upper.lower()] = upper
    statuses = frozenset(canonical)
    for reported, target in st.aliases.items():
        where = f"{name}.aliases.{reported}"
        if not isinstance(reported, str) or not reported.strip():
            raise ValueError(f"{name}.aliases: {reported!r} is not a non-empty string")
        if not isinstance(target, str):
            raise ValueError(f"{where}: target must be a string, got {type(target).__name__}")
        if target.upper() not in statuses:
            raise ValueError(f"{where}: target {target!r} is not a {name} status")
        key = reported.strip().lower()
        existing = lookup.get(key)
        # An alias may restate a canonical status's own spelling, but must not
        # redirect it (e.g. "Running" -> STOPPED) or contradict another alias
        # that differs only in case.
        if existing is not None and existing != target.upper():
            raise ValueError(
                f"{where}: {reported!r} already means {existing}, cannot also mean {target.upper()}"
            )
        lookup[key] = target.upper()
    return tuple(canonical), lookup


def _norm(reported: object) -> object:
    return reported.strip().lower() if isinstance(reported, str) else reported


def _parse_mapping(
    obj: Mapping[str, Any], base: Mapping[str, ServiceType] | None
) -> list[ServiceType]:
    """Turn the plain-dict form into ServiceTypes, merged onto `base`."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"catalog: expected a table of service types, got {type(obj).__name__}")
    result: dict[str, ServiceType] = dict(base) if base else {}
    for name, entry in obj.items():
        if not isinstance(name, str) or not _TYPE_NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r}: a service type name is {_TYPE_NAME_RULE}")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{name}: expected a table with 'statuses' and 'aliases'")
        unknown = sorted(str(k) for k in entry if k not in _ENTRY_KEYS)
        if unknown:
            raise ValueError(f"{name}.{unknown[0]}: unknown key (expected 'statuses', 'aliases')")
        statuses = entry.get("statuses")
        aliases = entry.get("aliases", {})
        if statuses is not None and (
            isinstance(statuses, (str, bytes)) or not isinstance(statuses, (list, tuple))
        ):
            raise ValueError(f"{name}.statuses: expected a list of status names")
        if not isinstance(aliases, Mapping):
            raise ValueError(f"{name}.aliases: expected a table of reported = CANONICAL")
        previous = result.get(name)
        if previous is None:
            if not statuses:
                raise ValueError(f"{name}.statuses: must not be empty")
            result[name] = ServiceType(name, tuple(statuses), dict(aliases))
        else:
            merged_statuses = list(previous.statuses)
            seen = {s.lower() for s in merged_statuses}
            for status in statuses or ():
                # Validation of the value itself happens in _build_lookup.
                if isinstance(status, str) and status.lower() in seen:
                    continue
                merged_statuses.append(status)
            # Spellings are case-insensitive: an override "pending" replaces a
            # default "Pending" instead of contradicting it.
            overridden = {_norm(k) for k in aliases}
            merged_aliases = {
                k: v for k, v in previous.aliases.items() if _norm(k) not in overridden
            }
            merged_aliases.update(aliases)
            result[name] = ServiceType(name, tuple(merged_statuses), merged_aliases)
    return list(result.values())

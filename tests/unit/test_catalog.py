"""The service-type catalog: contract defaults, configuration parsing, merging."""

from __future__ import annotations

import pytest

from dcmstatus.core.catalog import Catalog, ServiceType

CONTRACT_STATUSES = {
    "vm": "PROVISIONING RUNNING STOPPING STOPPED PAUSED FAILED DELETING DELETED",
    "container": "PENDING RUNNING SUCCEEDED FAILED UNKNOWN DELETED",
    "storage": "PROVISIONING RUNNING FAILED DELETING DELETED",
    "network": "PENDING READY DELETED",
    "cluster": "PROGRESSING ACTIVE DEGRADED UNAVAILABLE FAILED DELETING DELETED",
    "database": "PENDING RUNNING FAILED UNKNOWN DELETING DELETED",
}

CONTRACT_ALIASES = [
    ("vm", "Pending", "PROVISIONING"),
    ("vm", "Scheduling", "PROVISIONING"),
    ("vm", "Scheduled", "PROVISIONING"),
    ("vm", "Succeeded", "STOPPED"),
    ("vm", "Terminating", "DELETING"),
    ("cluster", "PENDING", "PROGRESSING"),
    ("cluster", "PROVISIONING", "PROGRESSING"),
    ("cluster", "READY", "ACTIVE"),
]


def test_default_has_the_contract_types_and_statuses():
    catalog = Catalog.default()
    assert catalog.service_types() == tuple(CONTRACT_STATUSES)
    for name, statuses in CONTRACT_STATUSES.items():
        assert catalog.statuses(name) == tuple(statuses.split())


@pytest.mark.parametrize(("service_type", "reported", "canonical"), CONTRACT_ALIASES)
def test_default_aliases(service_type, reported, canonical):
    lookup = Catalog.default().status_lookup(service_type)
    assert lookup is not None
    assert lookup[reported.strip().lower()] == canonical


def test_status_lookup_keys_are_lower_case_canonical_and_aliases():
    lookup = Catalog.default().status_lookup("vm")
    assert lookup is not None
    assert lookup["running"] == "RUNNING"
    assert lookup["pending"] == "PROVISIONING"
    assert all(key == key.lower().strip() for key in lookup)
    assert set(lookup.values()) <= set(CONTRACT_STATUSES["vm"].split())
    # Statuses of other types are not vm statuses.
    assert "ready" not in lookup and "unknown" not in lookup


def test_status_lookup_unknown_type_is_none():
    assert Catalog.default().status_lookup("three_tier_app") is None
    assert Catalog.default().status_lookup("VM") is None


def test_canonical_status_trims_and_ignores_case():
    catalog = Catalog.default()
    assert catalog.canonical_status("cluster", "  ready ") == "ACTIVE"
    assert catalog.canonical_status("vm", "Exploded") is None
    assert catalog.canonical_status("nope", "RUNNING") is None


def test_statuses_of_unknown_type_raises_keyerror():
    with pytest.raises(KeyError):
        Catalog.default().statuses("nope")


def test_from_mapping_round_trips_the_default():
    default = Catalog.default()
    assert Catalog.from_mapping(default.to_mapping()) == default


def test_from_mapping_normalises_status_case():
    catalog = Catalog.from_mapping(
        {"job": {"statuses": ["queued", "Done"], "aliases": {"finished": "done"}}}
    )
    assert catalog.statuses("job") == ("QUEUED", "DONE")
    assert catalog.canonical_status("job", "FINISHED") == "DONE"


def test_from_mapping_aliases_are_optional():
    catalog = Catalog.from_mapping({"job": {"statuses": ["A"]}})
    assert catalog.status_lookup("job") == {"a": "A"}


@pytest.mark.parametrize(
    ("mapping", "named"),
    [
        ({"VM": {"statuses": ["A"]}}, "'VM'"),
        # Nothing a NATS subject token, a TOML bare key or a log line would split on.
        ({"three.tier": {"statuses": ["A"]}}, "'three.tier'"),
        ({"*": {"statuses": ["A"]}}, "'*'"),
        ({"app>": {"statuses": ["A"]}}, "'app>'"),
        ({"three tier": {"statuses": ["A"]}}, "'three tier'"),
        ({"Three-Tier": {"statuses": ["A"]}}, "'Three-Tier'"),
        ({"caf\u00e9": {"statuses": ["A"]}}, "'caf\u00e9'"),
        ({"": {"statuses": ["A"]}}, "''"),
        ({"job": {"statuses": []}}, "job.statuses"),
        ({"job": {}}, "job.statuses"),
        ({"job": {"statuses": "A B"}}, "job.statuses"),
        ({"job": {"statuses": ["A", "a"]}}, "job.statuses"),
        ({"job": {"statuses": ["A", ""]}}, "job.statuses"),
        ({"job": {"statuses": ["A", "has space"]}}, "job.statuses"),
        ({"job": {"statuses": ["A", 3]}}, "job.statuses"),
        ({"job": ["A"]}, "job"),
        ({"job": {"statuses": ["A"], "alias": {}}}, "job.alias"),
        ({"job": {"statuses": ["A"], "aliases": ["x"]}}, "job.aliases"),
        ({"job": {"statuses": ["A"], "aliases": {"x": "B"}}}, "job.aliases.x"),
        ({"job": {"statuses": ["A"], "aliases": {"x": 1}}}, "job.aliases.x"),
        ({"job": {"statuses": ["A"], "aliases": {" ": "A"}}}, "job.aliases"),
        # An alias may not redirect a canonical status...
        ({"job": {"statuses": ["A", "B"], "aliases": {"a": "B"}}}, "job.aliases.a"),
        # ...nor contradict another alias that differs only in case.
        ({"job": {"statuses": ["A", "B"], "aliases": {"x": "A", "X": "B"}}}, "job.aliases.X"),
    ],
)
def test_from_mapping_errors_name_the_key(mapping, named):
    with pytest.raises(ValueError) as info:
        Catalog.from_mapping(mapping)
    assert named in str(info.value)


def test_from_mapping_rejects_non_mapping():
    with pytest.raises(ValueError, match="catalog"):
        Catalog.from_mapping(["vm"])  # type: ignore[arg-type]


def test_alias_restating_a_canonical_status_is_allowed():
    catalog = Catalog.from_mapping({"job": {"statuses": ["DONE"], "aliases": {"Done": "DONE"}}})
    assert catalog.canonical_status("job", "done") == "DONE"


def test_merged_adds_a_type():
    base = Catalog.default()
    catalog = base.merged(
        {"three_tier_app": {"statuses": ["PENDING", "RUNNING", "FAILED"], "aliases": {"Up": "RUNNING"}}}
    )
    assert catalog.service_types() == (*base.service_types(), "three_tier_app")
    assert catalog.canonical_status("three_tier_app", "up") == "RUNNING"
    # The base catalog is unchanged.
    assert "three_tier_app" not in base


def test_merged_adds_an_alias_and_keeps_the_defaults():
    catalog = Catalog.default().merged({"vm": {"aliases": {"Migrating": "RUNNING"}}})
    assert catalog.canonical_status("vm", "migrating") == "RUNNING"
    assert catalog.canonical_status("vm", "Pending") == "PROVISIONING"
    assert catalog.statuses("vm") == Catalog.default().statuses("vm")


def test_merged_overrides_an_alias_case_insensitively():
    catalog = Catalog.default().merged({"vm": {"aliases": {"succeeded": "DELETED"}}})
    assert catalog.canonical_status("vm", "Succeeded") == "DELETED"
    assert "Succeeded" not in catalog.get("vm").aliases  # type: ignore[union-attr]


def test_merged_appends_statuses_without_duplicates():
    catalog = Catalog.default().merged({"network": {"statuses": ["ready", "DEGRADED"]}})
    assert catalog.statuses("network") == ("PENDING", "READY", "DELETED", "DEGRADED")


def test_merged_validates_like_from_mapping():
    with pytest.raises(ValueError, match=r"vm\.aliases\.Flying"):
        Catalog.default().merged({"vm": {"aliases": {"Flying": "AIRBORNE"}}})
    with pytest.raises(ValueError, match="new_type.statuses"):
        Catalog.default().merged({"new_type": {"aliases": {}}})


def test_constructor_validates_service_types():
    with pytest.raises(ValueError, match="defined twice"):
        Catalog([ServiceType("a", ("X",)), ServiceType("a", ("Y",))])
    with pytest.raises(ValueError, match="a.statuses"):
        Catalog([ServiceType("a", ())])


def test_catalog_does_not_share_alias_dicts():
    aliases = {"x": "A"}
    catalog = Catalog([ServiceType("job", ("A",), aliases)])
    aliases["y"] = "A"
    assert catalog.canonical_status("job", "y") is None
    assert catalog.get("job").aliases == {"x": "A"}  # type: ignore[union-attr]


def test_type_names_may_contain_hyphens_like_dcms_own():
    catalog = Catalog.default().merged({"three-tier-app-demo": {"statuses": ["PENDING", "RUNNING", "FAILED", "DELETED"]}})
    assert catalog.service_types()[-1] == "three-tier-app-demo"
    assert catalog.canonical_status("three-tier-app-demo", " running ") == "RUNNING"
    assert Catalog([ServiceType("a-b_c-9", ("UP",))]).statuses("a-b_c-9") == ("UP",)


def test_type_name_errors_say_what_a_name_is():
    with pytest.raises(ValueError, match=r"'dcm\.vm': a service type name is lower-case letters, digits, '_' and '-'"):
        Catalog.from_mapping({"dcm.vm": {"statuses": ["A"]}})
    with pytest.raises(ValueError, match="a service type name is"):
        Catalog([ServiceType("VM", ("UP",))])

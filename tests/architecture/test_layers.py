"""The layering is enforced, not only described (docs/architecture.md):

- `dcmstatus.core` is pure: importing it loads no I/O, concurrency, driver,
  server or logging module;
- adapters never import the command line, and the engine imports no adapter;
- `dcmstatus --help` and building the command line load neither the embedded
  servers nor the benchmark.

Each check runs in a fresh interpreter, so what another test imported first
cannot hide an import.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "dcmstatus"

FORBIDDEN_IN_CORE = (
    "trio", "trio_asyncio", "asyncio", "nats", "psycopg", "psycopg_pool", "hypercorn",
    "starlette", "anyio", "socket", "logging", "prometheus_client", "threading", "subprocess",
)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _top(name: str) -> str:
    return name.split(".")[0]


def test_core_imports_no_io_module() -> None:
    loaded = _modules_after(
        "import dcmstatus.core, dcmstatus.core.model, dcmstatus.core.errors, dcmstatus.core.catalog, "
        "dcmstatus.core.cloudevents, dcmstatus.core.decoding, dcmstatus.core.batching, dcmstatus.core.redaction"
    )
    bad = sorted(m for m in loaded if _top(m) in FORBIDDEN_IN_CORE)
    assert not bad, f"dcmstatus.core pulled in {bad}"
    # And nothing of ours outside core (the config or an adapter would bring I/O along).
    ours = sorted(m for m in loaded if m.startswith("dcmstatus.") and not m.startswith("dcmstatus.core"))
    assert not ours, f"dcmstatus.core imports {ours}"


def test_help_loads_no_devtools() -> None:
    loaded = _modules_after(
        "import contextlib, io\n"
        "from dcmstatus.cli.commands import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['serve', '--help'])\n"
    )
    assert "dcmstatus.devtools.bench" not in loaded
    assert "dcmstatus.devtools.embedded" not in loaded
    assert not {"psycopg", "nats", "trio", "hypercorn", "starlette"} & {_top(m) for m in loaded}


def _imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("core", ("dcmstatus.engine", "dcmstatus.adapters", "dcmstatus.cli", "dcmstatus.devtools",
                  "dcmstatus.service", "dcmstatus.config")),
        ("engine", ("dcmstatus.adapters", "dcmstatus.cli", "dcmstatus.devtools", "dcmstatus.service")),
        ("adapters", ("dcmstatus.cli", "dcmstatus.devtools", "dcmstatus.service")),
    ],
)
def test_layers_import_only_downwards(layer: str, forbidden: tuple[str, ...]) -> None:
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _imports_of(path):
            if name.startswith(forbidden):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_no_relative_imports() -> None:
    """Absolute imports only: a module's imports say which layer they reach."""
    offenders = [
        str(path.relative_to(PACKAGE.parent))
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not offenders, offenders


def test_http_layer_never_imports_the_database_driver() -> None:
    """The store translates driver failures (StoreUnavailable, InvalidInput,
    InstanceExists); the HTTP layer maps those, and never psycopg's own."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / "adapters" / "http").rglob("*.py"))
        for name in _imports_of(path)
        if _top(name) in ("psycopg", "psycopg_pool")
    ]
    assert not offenders, "\n".join(offenders)

"""The layers depend one way: the order the README's source layout gives.

model → disks → kvm → providers → jobs; each imports only from layers before it (and
from the service's common modules: errors, config, files, confine, staging, ...). The
job-kind protocols (job_kinds.JobContext) may be named for type checking. Nothing
below the engine imports the engine, the D-Bus skin or the daemon; the clients take from
the service only what both sides share.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["model", "disks", "kvm", "providers", "jobs"]
ABOVE_THE_LAYERS = {"engine", "dbus", "daemon"}


def _imports(path: Path, package: str) -> list[str]:
    """Every module `path` imports, as an absolute dotted name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found += ([module] if node.module else
                      [f"{module}.{alias.name}" for alias in node.names])
    return found


def _modules(tree: str, top: str):
    for path in sorted((ROOT / tree).rglob("*.py")):
        parts = [top] + list(path.relative_to(ROOT / tree).with_suffix("").parts)
        if parts[-1] == "__init__":
            yield path, ".".join(parts[:-1]), ".".join(parts[:-1])
        else:
            yield path, ".".join(parts), ".".join(parts[:-1])


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[:2] == ["hypersdk", "service"] and len(parts) > 2 else None


def test_service_layers_import_only_downwards():
    wrong = []
    for path, module, package in _modules("service", "hypersdk.service"):
        own = _layer(module)
        if own not in LAYERS:
            continue
        for target in _imports(path, package):
            other = _layer(target)
            if other in LAYERS and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{module} imports {target} (a later layer)")
            if other in ABOVE_THE_LAYERS:
                wrong.append(f"{module} imports {target} (above the layers)")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("tree,top", [("client", "hypersdk.client"), ("tui", "hypersdk.tui"),
                                      ("http_bridge", "hypersdk.http_bridge")])
def test_clients_import_from_the_service_only_what_they_share(tree, top):
    """The version, the config file's reader (the bridge's `api` section lives in the
    service's config file) and the REST roles both sides check."""
    allowed = {"hypersdk.service", "hypersdk.service.__version__", "hypersdk.service.config",
               "hypersdk.service.config_schema", "hypersdk.service.principals"}
    wrong = [f"{module} imports {target}"
             for path, module, package in _modules(tree, top)
             for target in _imports(path, package)
             if target.startswith("hypersdk.service") and target not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_service_uses_only_the_bus_contract_and_connection_of_the_client():
    wrong = [f"{module} imports {target}"
             for path, module, package in _modules("service", "hypersdk.service")
             for target in _imports(path, package)
             if target.startswith("hypersdk.client")
             and target not in ("hypersdk.client.names", "hypersdk.client.bus")]
    assert not wrong, "\n".join(wrong)

"""hypervisord's configuration file (`config.yaml`), checked in full at start.

The schema is the spec's (daemon, providers, hyper2kvm, export, database, webhooks)
plus `libvirt`, `api` and `targets`. `${VAR}` anywhere in a string is replaced from the
environment; a variable that is not set is an error naming it. Every broken rule
is reported as one line (`ConfigError.problems`) and nothing is touched.
"""
from __future__ import annotations

import importlib
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .confine import default_roots
from .config_schema import ConfigProblem, Field, Schema, validate
from .kvm.cpu_choice import AUTO, cpu_mode_rule
from .kvm.targets import NAME_RE, TARGET_SCHEMA
from .webhook_targets import targets_rule

DEFAULT_CONFIG_PATH = Path("/etc/hypersdk/config.yaml")
PROVIDER_KINDS = ("vsphere", "aws", "azure", "gcp", "hyperv", "oci", "ova")
WEBHOOK_EVENTS = (
    "job.started", "job.completed", "job.failed", "job.cancelled",
    "schedule.triggered", "backup.retention_applied",
)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ASCII_DIGITS_RE = re.compile(r"[0-9]{1,5}")
_SERVER_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", re.IGNORECASE)
_ORIGIN_RE = re.compile(r"https?://[^\s/?#@]+", re.IGNORECASE)
_INSTANCE_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _address_rule(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not _ASCII_DIGITS_RE.fullmatch(port) or not int(port) < 65536:
        return "HOST:PORT with a port from 0 to 65535 (0: any free port)"
    return None


def _absolute_path_rule(value: str) -> str | None:
    return None if value.startswith("/") else "an absolute path"


def _absolute_paths_rule(values: list[str]) -> str | None:
    return None if all(v.startswith("/") for v in values) else "a list of absolute paths"


def _server_names_rule(values: list[str]) -> str | None:
    bad = [v for v in values if not _SERVER_NAME_RE.fullmatch(v)]
    return f"a list of DNS names without port ({bad[0]!r} is not one)" if bad else None


def _origins_rule(values: list[str]) -> str | None:
    bad = [v for v in values if not _ORIGIN_RE.fullmatch(v)]
    return (f"a list of origins such as https://console.example.com:8443, without path "
            f"({bad[0]!r} is not one)") if bad else None


def _database_url_rule(value: str) -> str | None:
    """database.url: empty (SQLite at database.path), sqlite:///absolute/path, or a
    PostgreSQL URL (a unix socket as postgresql://user@/db?host=/run/postgresql)."""
    if not value or re.match(r"^sqlite:///[^/]", value) or \
            re.match(r"^postgres(ql)?://[^\s]*/[^\s/?]+", value):
        return None
    return ("sqlite:///absolute/path or postgresql://[user[:password]@][host][:port]/database"
            "[?host=/socket/dir]")


def _instance_rule(value: str) -> str | None:
    return None if _INSTANCE_RE.fullmatch(value) else (
        "a name of 1 to 64 letters, digits, '.', '_' or '-' (unique among the hypervisords "
        "sharing a database)")


def _url_rule(value: str) -> str | None:
    return None if re.match(r"^https?://[^\s/]+", value) else "an http:// or https:// URL"


MAIN_SCHEMA: Schema = {
    "daemon": {
        "address": Field("str", "127.0.0.1:8080", check=_address_rule),
        "log_level": Field("str", "info", choices=("debug", "info", "warning", "error")),
        "workers": Field("int", 4, minimum=1),
        # how long a finished job stays a D-Bus object (as udisks' jobs do); its record
        # stays in the store (Manager.ListJobRecords, REST /jobs). 0: it leaves at once
        "finished_job_linger": Field("duration", 300.0, minimum=0),
        # this hypervisord's name among those sharing a database (database.url): recorded
        # on each job it runs (service/fleet.py)
        "instance": Field("str", socket.gethostname()[:64], check=_instance_rule),
    },
    "hyper2kvm": {
        "path": Field("str", "/usr/local/bin/hyper2kvm"),
        "daemon_enabled": Field("bool", False),
        "watch_dir": Field("str", "/var/lib/hyper2kvm/watch", check=_absolute_path_rule),
        "output_dir": Field("str", "/var/lib/kvm/images", check=_absolute_path_rule),
        "default_format": Field("str", "qcow2", choices=("qcow2", "raw")),
        "compression": Field("bool", False),
        "poll_interval": Field("duration", 5.0),
        "job_timeout": Field("duration", 7200.0),
    },
    "export": {
        "base_path": Field("str", "/var/lib/hypersdk/exports", check=_absolute_path_rule),
        "chunk_size": Field("size", 10 * 1024 * 1024, minimum=4096),
        "max_retries": Field("int", 3, minimum=0),
        "concurrent_exports": Field("int", 2, minimum=1),
        "parallel_disks": Field("int", 2, minimum=1),
        # how often a download records a verified checkpoint (0: never; an interrupted
        # download then starts again from byte 0), and whether jobs interrupted (by a
        # crash or a stop) with checkpointed downloads are retried, resuming, at start
        "checkpoint_interval": Field("size", 64 * 1024 * 1024, minimum=0),
        "resume_on_start": Field("bool", False),
    },
    "database": {
        "path": Field("str", "/var/lib/hypervisord/hypersdk.db", check=_absolute_path_rule),
        # where the store lives instead: sqlite:///path, or postgresql://... shared by
        # several hypervisords (service/pgstore.py); empty: SQLite at `path`
        "url": Field("str", "", check=_database_url_rule),
        # finished jobs kept (newest first) and for how long; older ones and their logs
        # are removed when a job ends and at start-up (0: no limit)
        "retention_count": Field("int", 5000, minimum=0),
        "retention_age": Field("duration", 90 * 86400.0, minimum=0),
        # instances sharing the database (service/fleet.py): each renews a lease this long
        # (its heartbeat: every third of it); another takes over the jobs of one whose lease
        # ran out. Pending jobs, cancels and other instances' jobs are looked for every
        # poll_interval (a job submitted here starts at once)
        "lease_seconds": Field("duration", 30.0, minimum=1),
        "poll_interval": Field("duration", 2.0, minimum=0.05),
        # PostgreSQL (service/pgstore.py): how long opening a connection may take, and one
        # statement (enforced by the server); a call past either fails with an error naming
        # the setting, and the next call connects again
        "connect_timeout": Field("duration", 10.0, minimum=2),
        "statement_timeout": Field("duration", 30.0, minimum=0.1),
    },
    "libvirt": {
        "uri": Field("str", "qemu:///system"),
        "network": Field("str", "default"),
        # the guest CPU: auto (probed once per URI, see kvm/cpu_choice.py) or pinned
        "cpu_mode": Field("str", AUTO, check=cpu_mode_rule),
    },
    "api": {
        "auth": Field("str", "token", choices=("none", "token")),
        "tokens_file": Field("str", "/etc/hypersdk/tokens.yaml", check=_absolute_path_rule),
        # Host names the bridge answers to besides localhost and addresses (DNS rebinding)
        "server_names": Field("list[str]", [], check=_server_names_rule),
        # browser origins (scheme://host[:port]) whose pages may call the API
        "allowed_origins": Field("list[str]", [], check=_origins_rule),
        "tls_cert": Field("str", ""),
        "tls_key": Field("str", ""),
        "max_body_bytes": Field("size", 1024 * 1024, minimum=1024),
        "audit_log": Field("str", "/var/log/hypersdk/audit.log", check=_absolute_path_rule),
        # the Unix user hypersdk-bridge runs as: hypervisord lets only it (and root) make
        # calls on behalf of a REST user (service/dbus/dispatch.py)
        "bridge_user": Field("str", "hypersdk"),
    },
    "guest_conversion": {  # virt-v2v-in-place (kvm/guest_conversion.py)
        "virtio_win": Field("str", "", check=lambda v: None if not v or v.startswith("/")
                            else "an absolute path to virtio-win.iso or its directory"),
        "timeout": Field("duration", 3600.0, minimum=1),
    },
    "automation": {
        "missed_run_grace": Field("duration", 3600.0),
        "webhook_timeout": Field("duration", 10.0),
        "webhook_max_attempts": Field("int", 8, minimum=1),
        "webhook_retry_base": Field("duration", 5.0),  # first retry delay; doubles each time
        # private hosts webhooks may reach, as host or host:port (public ones need no entry)
        "webhook_private_targets": Field("list[str]", [], check=targets_rule),
    },
    "ova": {
        "import_dirs": Field("list[str]", ["/var/lib/hypersdk/imports"]),
    },
    # Where callers may name files (service/confine.py); empty: the defaults there.
    "paths": {
        "sources": Field("list[str]", [], check=_absolute_paths_rule),
        "outputs": Field("list[str]", [], check=_absolute_paths_rule),
    },
}

WEBHOOK_SCHEMA: Schema = {
    "url": Field("str", check=_url_rule),
    "events": Field("list[str]", check=lambda v: None if v and set(v) <= set(WEBHOOK_EVENTS)
                    else "a non-empty list of " + ", ".join(WEBHOOK_EVENTS)),
    "headers": Field("map[str,str]", {}),
    "secret": Field("str", "", secret=True),
}


class ConfigError(Exception):
    """The config file is unusable; `problems` holds one line per broken rule."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Section:
    """Attribute access over one validated section: `config.export.chunk_size`."""

    values: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Config:
    daemon: Section
    hyper2kvm: Section
    export: Section
    database: Section
    libvirt: Section
    api: Section
    automation: Section
    guest_conversion: Section
    ova: Section
    paths: Section
    providers: dict[str, dict]  # name -> validated section, with "type"
    webhooks: list[dict]
    targets: dict[str, dict]  # name -> {uri, pool, format} (kvm/targets.py)
    source: str  # the file it came from, or "(defaults)"


def _provider_module(kind: str):
    try:
        return importlib.import_module(f"hypersdk.service.providers.{kind}")
    except ImportError:
        return None  # reported when the provider is used (ProviderRegistry.check_usable)


def provider_schema(kind: str) -> Schema:
    """The config schema a provider module declares as CONFIG_SCHEMA."""
    schema = dict(getattr(_provider_module(kind), "CONFIG_SCHEMA", {}))
    schema.setdefault("type", Field("str", kind, choices=PROVIDER_KINDS))
    schema.setdefault("enabled", Field("bool", True))
    return schema


def _expand_env(value: Any, path: str, env: dict, problems: list[ConfigProblem]) -> Any:
    if isinstance(value, str):
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in env:
                problems.append(ConfigProblem(path, f"environment variable {name} to be set",
                                              "it unset"))
                return ""
            return env[name]
        return _ENV_RE.sub(replace, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), env, problems)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


def _named_sections(data: Any, key: str, what: str,
                    problems: list[ConfigProblem]) -> list[tuple[str, str, Any]]:
    """(name, key path, section) of each entry of a mapping of named sections (providers,
    targets) whose name is well-formed; the others are reported."""
    if data is None:
        return []
    if not isinstance(data, dict):
        problems.append(ConfigProblem(key, f"a mapping of {what} names", repr(data)))
        return []
    named = []
    for name, section in data.items():
        path = f"{key}.{name}"
        if NAME_RE.fullmatch(str(name)):
            named.append((name, path, section))
        else:
            problems.append(ConfigProblem(path, "a name of lower-case letters, digits, - and _",
                                          repr(name)))
    return named


def _validate_providers(data: Any, problems: list[ConfigProblem]) -> dict[str, dict]:
    result = {}
    for name, path, section in _named_sections(data, "providers", "provider", problems):
        kind = section.get("type", name) if isinstance(section, dict) else name
        if kind not in PROVIDER_KINDS:
            problems.append(ConfigProblem(f"{path}.type", "one of " + ", ".join(PROVIDER_KINDS),
                                          repr(kind)))
            continue
        result[name] = validate(provider_schema(kind), section, path, problems)
        finish = getattr(_provider_module(kind), "CONFIG_FINISH", None)
        if finish is not None:  # rules between keys, values derived from others
            problems.extend(finish(result[name], path))
    return result


def _validate_webhooks(data: Any, problems: list[ConfigProblem]) -> list[dict]:
    if data is None:
        return []
    if not isinstance(data, list):
        problems.append(ConfigProblem("webhooks", "a list of webhooks", repr(data)))
        return []
    return [validate(WEBHOOK_SCHEMA, item, f"webhooks[{i}]", problems) for i, item in enumerate(data)]


def _validate_targets(data: Any, problems: list[ConfigProblem]) -> dict[str, dict]:
    """`targets:`, libvirt hosts with a storage pool that jobs may name (kvm/targets.py)."""
    return {name: validate(TARGET_SCHEMA, section, path, problems)
            for name, path, section in _named_sections(data, "targets", "target", problems)}


def parse_config(document: Any, source: str, env: dict | None = None) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    problems: list[ConfigProblem] = []
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError([ConfigProblem("(top level)", "a mapping", type(document).__name__)])
    document = _expand_env(document, "", dict(os.environ if env is None else env), problems)
    elsewhere = ("providers", "webhooks", "targets")
    main_part = {k: v for k, v in document.items() if k not in elsewhere}
    sections = validate(MAIN_SCHEMA, main_part, "", problems, elsewhere)
    providers = _validate_providers(document.get("providers"), problems)
    webhooks = _validate_webhooks(document.get("webhooks"), problems)
    targets = _validate_targets(document.get("targets"), problems)
    if problems:
        raise ConfigError(problems)
    _fill_default_roots(sections)
    return Config(**{k: Section(v) for k, v in sections.items()}, providers=providers,
                  webhooks=webhooks, targets=targets, source=source)


def _fill_default_roots(sections: dict) -> None:
    sources, outputs = default_roots(sections)
    paths = sections["paths"]
    paths["sources"] = paths["sources"] or sources
    paths["outputs"] = paths["outputs"] or outputs


def load_config(path: Path | None, env: dict | None = None) -> Config:
    """Read and validate the file at `path` (None: built-in defaults only)."""
    if path is None:
        return parse_config({}, "(defaults)", env)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "a readable file", exc.strerror or str(exc))])
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigProblem(where, "valid YAML", problem)])
    return parse_config(document, str(path), env)

"""The config file: the spec's schema, ${VAR} expansion, one clear line per broken rule."""
from __future__ import annotations

import subprocess
import sys

import pytest

from hypersdk.service.config import ConfigError, load_config, parse_config
from hypersdk.service.config_schema import parse_duration, parse_size

SPEC_CONFIG = """
daemon:
  address: "0.0.0.0:8080"
  log_level: "info"
  workers: 4
hyper2kvm:
  path: "/usr/local/bin/hyper2kvm"
  daemon_enabled: true
  watch_dir: "/var/lib/hyper2kvm/watch"
  output_dir: "/var/lib/kvm/images"
  default_format: "qcow2"
  compression: true
  poll_interval: "5s"
  job_timeout: "2h"
export:
  base_path: "/exports"
  chunk_size: 10485760  # 10MB
  max_retries: 3
  concurrent_exports: 2
database:
  path: "/var/lib/hypervisord/hypersdk.db"
webhooks:
  - url: "https://slack.example.com/webhook"
    events: ["job.failed"]
"""


def problems_of(text: str, env: dict | None = None) -> list[str]:
    import yaml
    with pytest.raises(ConfigError) as caught:
        parse_config(yaml.safe_load(text), "test", env or {})
    return [str(p) for p in caught.value.problems]


def test_the_spec_example_loads_with_its_values():
    import yaml
    config = parse_config(yaml.safe_load(SPEC_CONFIG), "spec", {})
    assert config.daemon.workers == 4
    assert config.hyper2kvm.poll_interval == 5.0
    assert config.hyper2kvm.job_timeout == 7200.0
    assert config.export.chunk_size == 10485760
    assert config.webhooks[0]["events"] == ["job.failed"]
    assert config.libvirt.uri == "qemu:///system"  # a default


def test_defaults_for_everything_optional():
    config = parse_config({}, "empty", {})
    assert config.daemon.address == "127.0.0.1:8080"
    assert config.export.max_retries == 3
    assert config.providers == {} and config.webhooks == []
    assert config.api.auth == "token" and config.api.bridge_user == "hypersdk"
    assert config.daemon.finished_job_linger == 300.0


@pytest.mark.parametrize("text, line", [
    ("daemon: {workers: 0}", "config: daemon.workers: expected a value >= 1, found 0"),
    ("daemon: {workers: four}", "config: daemon.workers: expected an integer, found 'four'"),
    ("daemon: {colour: red}", "config: daemon.colour: expected one of the known keys"),
    ("deamon: {}", "config: deamon: expected one of the known keys"),
    ("daemon: {finished_job_linger: -1}",
     "config: daemon.finished_job_linger: expected a duration such as 5s, 10m or 2h"),
    ("daemon: {finished_job_linger: later}",
     "config: daemon.finished_job_linger: expected a duration such as 5s, 10m or 2h, "
     "found 'later'"),
    ("hyper2kvm: {poll_interval: soon}",
     "config: hyper2kvm.poll_interval: expected a duration such as 5s, 10m or 2h, found 'soon'"),
    ("export: {chunk_size: lots}", "config: export.chunk_size: expected a size"),
    ("daemon: {address: 'localhost'}", "config: daemon.address: expected HOST:PORT"),
    ("daemon: {address: '127.0.0.1:８０'}", "config: daemon.address: expected HOST:PORT"),
    ("api: {server_names: ['evil.example:8080']}",
     "config: api.server_names: expected a list of DNS names without port"),
    ("api: {allowed_origins: ['https://console.example.com/app']}",
     "config: api.allowed_origins: expected a list of origins such as"),
    ("api: {auth: basic}", "config: api.auth: expected one of none, token"),
    ("hyper2kvm: {default_format: vmdk}",
     "config: hyper2kvm.default_format: expected one of qcow2, raw, found 'vmdk'"),
    ("database: {path: relative.db}", "config: database.path: expected an absolute path"),
    ("database: {url: 'mysql://db/jobs'}",
     "config: database.url: expected sqlite:///absolute/path or postgresql://"),
    ("database: {url: 'sqlite://relative.db'}",
     "config: database.url: expected sqlite:///absolute/path or postgresql://"),
    ("database: {statement_timeout: 0}",
     "config: database.statement_timeout: expected a value >= 0.1, found 0"),
    ("database: {connect_timeout: 1s}",
     "config: database.connect_timeout: expected a value >= 2, found '1s'"),
    ("libvirt: {cpu_mode: host-pasthrough}",
     "config: libvirt.cpu_mode: expected one of auto, host-passthrough, host-model, maximum, "
     "tcg or custom:MODEL (e.g. custom:EPYC), found 'host-pasthrough'"),
    ("libvirt: {cpu_mode: 'custom:'}", "config: libvirt.cpu_mode: expected one of auto"),
    ("webhooks: [{url: 'ftp://x', events: [job.failed]}]",
     "config: webhooks[0].url: expected an http:// or https:// URL"),
    ("webhooks: [{url: 'http://x', events: [job.exploded]}]",
     "config: webhooks[0].events: expected a non-empty list of job.started"),
    ("providers: {mars: {host: x}}", "config: providers.mars.type: expected one of vsphere"),
    ("[1, 2]", "config: (top level): expected a mapping"),
])
def test_each_bad_value_gives_one_line_naming_key_expected_and_found(text, line):
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(line), problems[0]


@pytest.mark.parametrize("url", [
    "", "sqlite:///var/lib/hypervisord/jobs.db",
    "postgresql://hypersdk:secret@db.example:5432/jobs", "postgres://db/jobs", "postgresql://hypersdk@/jobs?host=/run/postgresql"])
def test_database_urls_accepted(url):
    assert parse_config({"database": {"url": url}}, "t", {}).database.url == url


def test_env_expansion_and_a_missing_variable_named():
    config = parse_config({"database": {"path": "${STATE}/db"}}, "t", {"STATE": "/srv"})
    assert config.database.path == "/srv/db"
    assert problems_of("database: {path: '${NOPE}/db'}") == [
        "config: database.path: expected environment variable NOPE to be set, found it unset"]


def test_several_problems_are_all_reported():
    assert len(problems_of("daemon: {workers: 0, log_level: loud}\nexport: {max_retries: -1}")) == 3


@pytest.mark.parametrize("text, seconds", [("5s", 5), ("2h", 7200), ("250ms", 0.25), ("1.5m", 90),
                                           (30, 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, size", [("10MB", 10_000_000), ("10MiB", 10 << 20), ("512K", 512_000),
                                        ("64KiB", 65536), (4096, 4096), ("1G", 10**9)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_hypervisord_refuses_a_bad_config_with_one_line_each_and_touches_nothing(tmp_path):
    db = tmp_path / "state" / "x.db"
    config = tmp_path / "config.yaml"
    config.write_text(f"daemon: {{workers: 0}}\ndatabase: {{path: {db}}}\nbogus: 1\n")
    result = subprocess.run([sys.executable, "-m", "hypersdk.service.daemon", "--config",
                             str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config: bogus: expected one of the known keys (api, automation, daemon, database, "
        "export, guest_conversion, hyper2kvm, libvirt, ova, paths, providers, targets, "
        "webhooks), "
        "found an unknown key",
        "config: daemon.workers: expected a value >= 1, found 0",
    ]
    assert not db.parent.exists()


def test_check_config_validates_and_exits(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(SPEC_CONFIG)
    result = subprocess.run([sys.executable, "-m", "hypersdk.service.daemon", "--check-config",
                             "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"config: {config}: ok"


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="expected a readable file"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("daemon: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+:\d+: expected valid YAML"):
        load_config(broken)


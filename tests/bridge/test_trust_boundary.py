"""The bridge plays the attacker's targets (issue 13): REST users acting as each other, DNS
rebinding, cross-origin pages, tokens in URLs, revoked tokens, an unauthenticated default.

Real hypersdk-bridge and hypervisord processes, the private dbus-daemon and polkitd;
clients are curl and aiohttp sending what browsers send (Host, Origin).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from hypersdk.http_bridge.auth import token_digest
from hypersdk.service.config import load_config, parse_config

from ..support.cli import busctl
from ..support.hypervisord import write_config
from ..support.system import REPO
from .conftest import submit_sleep
from .stack import ADMIN_TOKEN, ANY_PORT, Bridge, curl, post_json, wait_status, write_curlrc

OTTO, OLGA = "otto-operator-token-0123456789", "olga-operator-token-0123456789"
VERA, ADA = "vera-viewer-token-0123456789ab", "ada-admin-token-0123456789abcd"
PEOPLE = {OTTO: ("otto", "operator"), OLGA: ("olga", "operator"), VERA: ("vera", "viewer"),
          ADA: ("ada", "admin"), ADMIN_TOKEN: ("admin", "admin")}
PAGE_ORIGIN = "https://console.example.com"
SERVER_NAME = "hypersdk.example.com"


def write_tokens(path: Path, people: dict[str, tuple[str, str]]) -> Path:
    """A tokens file as --init-tokens writes them: digests only, 0640 root:hypersdk."""
    path.write_text(yaml.safe_dump({
        token_digest(token): {"name": name, "role": role}
        for token, (name, role) in people.items()}))
    os.chown(path, 0, grp.getgrnam("hypersdk").gr_gid)
    path.chmod(0o640)
    return path


@pytest.fixture
def guarded(start_bridge, service_dir) -> Bridge:
    """A bridge with the tokens above (and the admin token of curl's config file)."""
    write_curlrc(service_dir)
    tokens = write_tokens(service_dir / "people.yaml", PEOPLE)
    return start_bridge(daemon={"workers": 1}, api={
        "auth": "token", "tokens_file": str(tokens), "server_names": [SERVER_NAME],
        "allowed_origins": [PAGE_ORIGIN]})


def _disk(service_dir: Path) -> Path:
    """A small qcow2 under export.base_path (a source root once paths are confined)."""
    exports = service_dir / "exports"
    exports.mkdir(exist_ok=True)
    disk = exports / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    return disk


def _convert(bridge: Bridge, service_dir: Path, token: str, name: str) -> str:
    answer = post_json(bridge, "/convert", {
        "source_path": str(_disk(service_dir)),
        "output_path": str(service_dir / "kvm" / f"{name}.raw"),
        "conversion_options": {"format": "raw"}}, token=token)
    assert answer.status == 200, answer.body
    return answer.json()["job_id"]


# -- the end user is the subject ----------------------------------------------------------
def test_every_call_to_hypervisord_names_the_rest_principal(guarded, system_bus, service_dir):
    """Every method call the bridge makes carries requested_by/requested_role (the
    authenticated REST identity), seen on the bus by a monitor."""
    job_id = submit_sleep(system_bus.address, steps=100, interval=0.1)  # before: not watched
    monitor = subprocess.Popen(["busctl", f"--address={system_bus.address}", "monitor",
                                "--json=short", "org.hypersdk.HyperSDK1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "Monitoring" in monitor.stderr.readline()
        curl(guarded, f"/parse-vmdk?path={service_dir}/none.vmdk", token=VERA)
        curl(guarded, f"/jobs/logs/{job_id}", token=VERA)
        post_json(guarded, "/jobs/submit", {"vm_identifier": "vm-1", "provider": "x"}, token=OTTO)
        post_json(guarded, f"/jobs/cancel/{job_id}", {}, token=ADA)  # root's job: an admin's
        post_json(guarded, "/schedules/create", {"name": "n", "cron": "x"}, token=OTTO)
        post_json(guarded, "/webhooks/configure", {"url": "ftp://x", "events": []}, token=ADA)
        wait_status(guarded, job_id, {"cancelled"})
    finally:
        monitor.terminate()
        output, _ = monitor.communicate(timeout=10)
    calls = [m for m in map(json.loads, output.splitlines()) if m["type"] == "method_call"
             and m.get("interface", "").startswith("org.hypersdk.HyperSDK1.")]
    options = [m["payload"]["data"][-1] for m in calls]
    seen = {(m["member"], o["requested_by"]["data"], o["requested_role"]["data"])
            for m, o in zip(calls, options)}
    assert seen == {("ParseVmdk", "vera", "viewer"), ("GetJobLog", "vera", "viewer"),
                    ("SubmitJob", "otto", "operator"), ("CancelJob", "ada", "admin"),
                    ("CreateSchedule", "otto", "operator"), ("ConfigureWebhook", "ada", "admin")}


def test_rest_users_of_the_same_role_cannot_cancel_each_others_jobs(guarded, system_bus,
                                                                    service_dir):
    """Needs the service side (hypervisord records requested_by as RequestedBy and applies
    cancel-job-other-user between REST principals); fails on a bridge-only branch."""
    hog = submit_sleep(system_bus.address, steps=300, interval=0.1)  # the only worker: busy
    try:
        wait_status(guarded, hog, {"running"})
        otto_job = _convert(guarded, service_dir, OTTO, "otto")
        assert curl(guarded, f"/jobs/query?job_id={otto_job}", token=OTTO).json()[
            "requested_by"] == "rest:otto"
        refused = post_json(guarded, f"/jobs/cancel/{otto_job}", {}, token=OLGA)
        assert refused.status == 403 and refused.json()["error"] == "Forbidden", refused.body
        assert post_json(guarded, f"/jobs/cancel/{otto_job}", {}, token=OTTO).status == 200
        wait_status(guarded, otto_job, {"cancelled"})
        retried = post_json(guarded, f"/jobs/retry/{otto_job}", {}, token=OLGA)
        assert retried.status == 403 and "olga" in retried.json()["message"], retried.body
        olga_job = _convert(guarded, service_dir, OLGA, "olga")
        assert post_json(guarded, f"/jobs/cancel/{olga_job}", {}, token=ADA).status == 200
    finally:
        busctl(system_bus.address, "call", "org.hypersdk.HyperSDK1",
               f"/org/hypersdk/HyperSDK1/jobs/{hog.replace('-', '_')}",
               "org.hypersdk.HyperSDK1.Job", "Cancel", "a{sv}", "0")


# -- safe by default ------------------------------------------------------------------------
def test_the_default_and_the_shipped_config_need_a_token(service_dir):
    assert parse_config({}, "(spec's config: no api section)").api.auth == "token"
    shipped = load_config(REPO / "data/config.example.yaml", env={"VSPHERE_PASSWORD": "x"})
    assert shipped.api.auth == "token"
    # without a tokens file the bridge does not start: nothing is ever served unauthenticated
    config = write_config(service_dir, api={"tokens_file": str(service_dir / "missing.yaml")})
    done = subprocess.run([sys.executable, "-m", "hypersdk.http_bridge.main", "--config",
                           str(config)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "api.tokens_file" in done.stderr


def _init_tokens(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypersdk.http_bridge.main", "--init-tokens",
                           "--config", str(config)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_init_tokens_makes_a_first_admin_token_once(bridge_account, service_dir, system_bus,
                                                    start_hypervisord):
    etc = service_dir / "etc"
    tokens = etc / "tokens.yaml"
    daemon = start_hypervisord(daemon={"address": ANY_PORT},
                               api={"tokens_file": str(tokens)})
    first = _init_tokens(daemon.config_path)
    assert first.returncode == 0 and "created" in first.stdout, first.stderr
    token = (etc / "admin.token").read_text().strip()
    secret_stat, tokens_stat = (etc / "admin.token").stat(), tokens.stat()
    assert (secret_stat.st_mode & 0o777, secret_stat.st_uid) == (0o600, 0)
    assert (tokens_stat.st_mode & 0o777, tokens_stat.st_uid) == (0o640, 0)
    assert tokens_stat.st_gid == grp.getgrnam("hypersdk").gr_gid
    assert token not in tokens.read_text() and "sha256:" in tokens.read_text()
    before = tokens.read_text()
    again = _init_tokens(daemon.config_path)
    assert again.returncode == 0 and "left as it is" in again.stdout
    assert tokens.read_text() == before and (etc / "admin.token").read_text().strip() == token
    # the bridge, as the hypersdk user, reads the file; the token is an admin's
    logs = service_dir / "logs"
    logs.mkdir()
    account = pwd.getpwuid(bridge_account)
    os.chown(logs, account.pw_uid, account.pw_gid)
    config = write_config(service_dir, daemon={"address": ANY_PORT},
                          api={"tokens_file": str(tokens), "audit_log": str(logs / "a.log")})
    bridge = Bridge(config, system_bus.address, user=account.pw_name)
    try:
        bridge.start()
        assert curl(bridge, "/jobs", token="x" * 20).status == 401
        hook = {"url": "https://hooks.example.com/x", "events": ["job.failed"]}
        assert post_json(bridge, "/webhooks/configure", hook, token=token).status == 200
    finally:
        bridge.stop()


# -- Host and Origin ------------------------------------------------------------------------
def test_a_host_the_bridge_does_not_serve_is_refused(guarded):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1."""
    for path in ("/health", "/jobs"):
        refused = curl(guarded, path, "-H", f"Host: evil.example:{guarded.port}", token=VERA)
        assert refused.status == 421, refused.body
        assert refused.json()["field"] == "Host" and "evil.example" in refused.json()["message"]
    for host in (f"localhost:{guarded.port}", f"{SERVER_NAME}:{guarded.port}",
                 f"127.0.0.1:{guarded.port}", f"[::1]:{guarded.port}", "LOCALHOST."):
        assert curl(guarded, "/jobs", "-H", f"Host: {host}", token=VERA).status == 200, host


async def test_a_cross_origin_websocket_or_request_is_refused(guarded):
    url = f"ws://127.0.0.1:{guarded.port}/websocket?access_token={VERA}"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, origin="http://evil.example")
        assert refused.value.status == 403
        for origin in (PAGE_ORIGIN, f"http://127.0.0.1:{guarded.port}"):  # listed; its own
            async with session.ws_connect(url, origin=origin) as ws:
                await ws.send_json({"type": "ping"})
                assert (await ws.receive_json(timeout=5)) == {"type": "pong"}
    forged = curl(guarded, "/jobs", "-H", "Origin: http://evil.example", token=VERA)
    assert forged.status == 403 and forged.json()["field"] == "Origin"
    assert "api.allowed_origins" in forged.json()["message"]


def test_a_token_in_the_url_is_refused_on_rest_routes(guarded):
    for path in (f"/jobs?access_token={VERA}", f"/health?access_token={VERA}"):
        refused = curl(guarded, path)
        assert refused.status == 400 and refused.json()["field"] == "access_token", path
    twice = curl(guarded, "/jobs", "-H", f"Authorization: Bearer {VERA}", token=ADA)
    assert twice.status == 401 and "exactly one" in twice.json()["message"]


async def test_removing_a_token_closes_the_websockets_opened_with_it(guarded, service_dir):
    base = f"ws://127.0.0.1:{guarded.port}/websocket?access_token="
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(base + VERA) as removed, \
                session.ws_connect(base + OTTO) as kept:
            remaining = {t: p for t, p in PEOPLE.items() if t != VERA}
            write_tokens(service_dir / "people.yaml", remaining)
            guarded.process.send_signal(signal.SIGHUP)
            message = await removed.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.CLOSE and removed.close_code == 1008
            await kept.send_json({"type": "ping"})
            assert (await kept.receive_json(timeout=5)) == {"type": "pong"}
    assert "closed 1 WebSockets" in guarded.log()


# -- bad input --------------------------------------------------------------------------------
MALFORMED_QUERIES = [
    ("/jobs?limit=%C2%B2", "limit"), ("/jobs?offset=%D9%A3", "offset"),
    ("/jobs?limit=1%E2%81%B0", "limit"), ("/jobs?limit=-1", "limit"),
    ("/jobs?limit=%20", "limit"), ("/jobs?limit=%FF", "limit"), ("/jobs?limit=%", "limit"),
    ("/jobs?status=%FF", "status"), ("/jobs/query?job_id=%00", "job_id"),
    ("/parse-vmdk?path=%00", "path"), ("/vms/info?provider=%00&identifier=x", "provider"),
]


def test_malformed_query_values_are_400_naming_the_parameter(guarded):
    """`GET /jobs?limit=²` (str.isdigit() takes '²'), bad UTF-8, NUL; never a 500."""
    for path, field in MALFORMED_QUERIES:
        answer = curl(guarded, path, token=VERA)
        assert answer.status == 400 and answer.json()["field"] == field, (path, answer.body)
    for path in ("/jobs/query?job_id=%ED%A0%80", "/jobs/query?job_id=%FF"):  # no such job
        answer = curl(guarded, path, token=VERA)
        assert answer.status == 404 and answer.json()["field"] == "job_id", (path, answer.body)


@pytest.mark.parametrize("body, field, rule", [
    ('{"a": ' * 40 + "1" + "}" * 40, "body", "nested deeper than 32 levels"),
    ('{"vm_identifier": "v", "provider": "p", "options": {"size": ' + str(2**70) + "}}",
     "options.size", "integer from -2^63 to 2^64-1"),
    ('{"vm_identifier": "v", "n": 1e400}', "n", "finite number"),
    ('{"vm_identifier": "v", "n": NaN}', "n", "finite number"),
])
def test_deep_json_and_huge_numbers_are_400_naming_the_rule(guarded, body, field, rule):
    answer = post_json(guarded, "/jobs/submit", body, token=OTTO)
    assert answer.status == 400, answer.body
    assert answer.json()["field"] == field and rule in answer.json()["message"]


def test_webhook_urls_are_shown_without_their_tokens(guarded):
    slack = "https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"
    created = post_json(guarded, "/webhooks/configure", {
        "url": slack, "events": ["job.failed"]}, token=ADA)
    assert created.status == 200, created.body
    listed = curl(guarded, "/webhooks", token=VERA).body
    assert "XXXXXXXXXXXXXXXXXXXXXXXX" not in created.body + listed
    assert "hooks.slack.com/services/T00000000/B00000000/<redacted>" in listed


def test_webhooks_to_private_addresses_are_refused(guarded):
    for url in ("http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data"):
        refused = post_json(guarded, "/webhooks/configure", {
            "url": url, "events": ["job.failed"]}, token=ADA)
        assert refused.status == 400 and refused.json()["field"] == "url", refused.body
        assert "automation.webhook_private_targets" in refused.json()["message"]

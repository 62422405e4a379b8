"""Bearer tokens and roles, the audit log, refusing unsafe setups, TLS."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
import yaml

from hypersdk.http_bridge.app import ROUTES
from hypersdk.http_bridge.auth import PUBLIC
from hypersdk.service.principals import role_at_least

from ..support.cli import BUS_NAME, MANAGER, MANAGER_IFACE, busctl
from ..support.hypervisord import write_config
from ..support.system import REPO
from ..support.wait import wait_until
from .stack import ANY_PORT, Bridge, curl, post_json, token_api

TOKENS = {
    "viewer-token-0123456789": {"name": "vera", "role": "viewer"},
    "operator-token-0123456789": {"name": "otto", "role": "operator"},
    "admin-token-0123456789abc": {"name": "ada", "role": "admin"},
}
VIEWER, OPERATOR, ADMIN = TOKENS


def write_tokens(directory, mode: int = 0o600):
    path = directory / "tokens.yaml"
    path.write_text(yaml.safe_dump(TOKENS))
    path.chmod(mode)
    return path


@pytest.fixture
def secured(start_bridge, service_dir):
    tokens = write_tokens(service_dir)
    return start_bridge(api={"auth": "token", "tokens_file": str(tokens)})


def audit_lines(bridge) -> list[dict]:
    path = bridge.config_path.parent / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokens_and_roles(secured, system_bus):
    assert curl(secured, "/health").status == 200  # public, for load balancers
    no_token = curl(secured, "/jobs")
    assert no_token.status == 401 and no_token.json()["error"] == "Unauthorized"
    assert curl(secured, "/jobs", token="not-a-valid-token-at-all").status == 401
    assert curl(secured, "/jobs", token=VIEWER).status == 200
    refused = post_json(secured, "/jobs/submit", {"provider": "x"}, token=VIEWER)
    assert refused.status == 403 and refused.json()["error"] == "Forbidden"
    passed = post_json(secured, "/jobs/submit", {"vm_identifier": "vm-1", "provider": "nope"},
                       token=OPERATOR)
    assert passed.status == 400 and passed.json()["field"] == "provider"
    hook = {"url": "https://example.com/hook", "events": ["job.failed"]}
    assert post_json(secured, "/webhooks/configure", hook, token=OPERATOR).status == 403
    assert post_json(secured, "/webhooks/configure", hook, token=ADMIN).status == 200


@pytest.mark.parametrize("sent, rule", [
    ("Basic abc", "the Authorization header must be 'Bearer <token>'"),
    ("Bearer ", "the Authorization header must be 'Bearer <token>'"),
    ("Bearer    ", "the Authorization header must be 'Bearer <token>'"),
], ids=["basic", "empty-bearer", "blank-bearer"])
def test_a_malformed_authorization_header_is_401_naming_the_form(secured, sent, rule):
    refused = curl(secured, "/jobs", authorization=sent)
    assert (refused.status, refused.json()["message"]) == (401, rule)


def test_two_authorization_headers_are_401(secured):
    refused = curl(secured, "/jobs", "-H", f"Authorization: Bearer {ADMIN}",
                   authorization=f"Bearer {VIEWER}")
    assert (refused.status, refused.json()["message"]) == \
        (401, "send exactly one Authorization header")


def test_every_mutating_or_refused_call_is_audited(secured):
    curl(secured, "/jobs")
    curl(secured, "/jobs", token="not-a-valid-token-at-all")
    post_json(secured, "/jobs/submit", {"provider": "x"}, token=VIEWER)
    post_json(secured, "/jobs/submit", {"vm_identifier": "vm-1", "provider": "nope"},
              token=OPERATOR)
    curl(secured, "/jobs", token=VIEWER)  # a plain read: not audited
    lines = audit_lines(secured)
    summary = [(l["who"], l["method"], l["path"], l["status"], l["result"]) for l in lines]
    assert summary == [
        ("unauthenticated", "GET", "/jobs", 401, "Unauthorized"),
        ("unauthenticated", "GET", "/jobs", 401, "Unauthorized"),
        ("vera", "POST", "/jobs/submit", 403, "Forbidden"),
        ("otto", "POST", "/jobs/submit", 400, "InvalidArgument"),
    ]
    assert all(l["time"].endswith("Z") and l["remote"] == "127.0.0.1" for l in lines)
    text = (secured.config_path.parent / "audit.log").read_text()
    assert "token" not in text.replace("Unauthorized", "")


async def test_websocket_needs_a_token_too(secured):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(secured.url + "/websocket")
        assert refused.value.status == 401
        async with session.ws_connect(f"{secured.url}/websocket?access_token={VIEWER}") as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=5)) == {"type": "pong"}


def run_bridge(config_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypersdk.http_bridge.main", "--config",
                           str(config_path)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_tokens_file_others_can_read_is_refused(service_dir):
    tokens = write_tokens(service_dir, 0o644)
    config = write_config(service_dir, api={"auth": "token", "tokens_file": str(tokens)})
    done = run_bridge(config)
    assert done.returncode == 2
    assert "api.tokens_file" in done.stderr and "0644" in done.stderr
    assert "token-0123" not in done.stderr


def test_a_token_name_hypervisord_would_refuse_is_named(service_dir):
    """The name travels as requested_by: a control character is refused at start."""
    tokens = service_dir / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"viewer-token-0123456789": {"name": "vera\nroot",
                                                                  "role": "viewer"}}))
    tokens.chmod(0o600)
    done = run_bridge(write_config(service_dir, api={"auth": "token",
                                                     "tokens_file": str(tokens)}))
    assert done.returncode == 2 and "entry 1: name expected 1-128 printable characters" in done.stderr


def test_auth_none_is_refused_off_loopback(service_dir):
    config = write_config(service_dir, daemon={"address": "0.0.0.0:8080"}, api={"auth": "none"})
    done = run_bridge(config)
    assert done.returncode == 2 and "api.auth: none" in done.stderr


def test_auth_none_on_loopback_is_a_logged_warning(start_bridge):
    bridge = start_bridge(api={"auth": "none"})
    assert "WARNING" in bridge.log() and "api.auth is none" in bridge.log()


def test_tls(start_bridge, service_dir):
    cert, key = service_dir / "cert.pem", service_dir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    bridge = start_bridge(api={"tls_cert": str(cert), "tls_key": str(key)})
    assert bridge.url.startswith("https://")
    done = subprocess.run(["curl", "-s", "--cacert", str(cert), bridge.url + "/health"],
                          capture_output=True, text=True, timeout=30)
    assert json.loads(done.stdout)["status"] == "healthy"


def test_body_over_the_limit_is_413(start_bridge):
    bridge = start_bridge(api={"max_body_bytes": 2048})
    big = json.dumps({"source_path": "/x" * 2000, "output_path": "/y"})
    answer = post_json(bridge, "/convert", big)
    assert answer.status == 413 and answer.json()["error"] == "PayloadTooLarge"
    chunked = curl(bridge, "/convert", "-X", "POST", "-H", "Transfer-Encoding: chunked",
                   "-H", "Content-Type: application/json", "--data-binary", big)
    assert chunked.status == 413 and chunked.json()["field"] == "body"


def test_the_bridge_never_needs_provider_credentials(service_dir, system_bus, users):
    """Provider secrets (${VAR}s of hypervisord's environment) are not the bridge's business."""
    config = write_config(service_dir, daemon={"address": ANY_PORT},
                          api=token_api(service_dir),
                          providers={"vsphere": {"type": "vsphere", "host": "vc.example.com",
                                                 "username": "u", "password": "${UNSET_PW}"}})
    bridge = Bridge(config, system_bus.address)
    try:
        bridge.start(wait_healthy=False)  # no hypervisord here: unhealthy, but serving
        assert curl(bridge, "/health").json()["status"] == "unhealthy"
    finally:
        bridge.stop()


def test_a_broken_bridge_setting_is_named(service_dir):
    config = write_config(service_dir, api={"max_body_bytes": "lots"})
    done = run_bridge(config)
    assert done.returncode == 2 and "api.max_body_bytes" in done.stderr


def test_an_unwritable_audit_log_or_a_busy_port_is_named(service_dir, users):
    (service_dir / "not-a-dir").write_text("")
    api = token_api(service_dir)
    config = write_config(service_dir, api={**api, "audit_log": str(service_dir / "not-a-dir"
                                                                      / "a.log")})
    done = run_bridge(config)
    assert done.returncode == 2 and "api.audit_log" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_bridge(write_config(service_dir, daemon={"address": f"127.0.0.1:{port}"},
                                       api=api))
    assert done.returncode == 1 and "daemon.address" in done.stderr
    assert "Traceback" not in done.stderr


def test_sighup_reloads_the_tokens(secured, service_dir):
    assert curl(secured, "/jobs", token=VIEWER).status == 200
    (service_dir / "tokens.yaml").write_text(yaml.safe_dump(
        {"rotated-token-0123456789": {"name": "vera", "role": "viewer"}}))
    secured.process.send_signal(signal.SIGHUP)
    wait_until(lambda: curl(secured, "/jobs", token="rotated-token-0123456789").status == 200,
               10, "the rotated token to be accepted")
    assert curl(secured, "/jobs", token=VIEWER).status == 401
    (service_dir / "tokens.yaml").chmod(0o644)  # a broken file keeps the tokens in use
    secured.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "kept the previous tokens" in secured.log(), 10, "the reload's verdict")
    assert curl(secured, "/jobs", token="rotated-token-0123456789").status == 200


ROLE_OF_TOKEN = {None: None, VIEWER: "viewer", OPERATOR: "operator", ADMIN: "admin"}


def expected_refusal(needed: str, role: str | None) -> int | None:
    """401 without a token, 403 below the route's role, else None (not refused)."""
    if needed == PUBLIC:
        return None
    if role is None:
        return 401
    return None if role_at_least(role, needed) else 403


def otto_job(address: str) -> str:
    """A running job of the operator otto's, submitted as the bridge would for him."""
    reply = busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                   json.dumps({"steps": 1000, "interval": 0.05}), "3", "kind", "s", "sleep",
                   "requested_by", "s", "otto", "requested_role", "s", "operator")
    return json.loads(reply.stdout.split()[1]).rsplit("/", 1)[-1].replace("_", "-")


def test_every_route_answers_every_role_as_the_route_table_says(secured, system_bus):
    """The whole route table, every role: the bridge's check and hypervisord's polkit
    answer (for the REST user the bridge names) must agree with the table. Job routes
    use a job of the operator's own, so hypervisord's check is reached too."""
    job_id = otto_job(system_bus.address)
    wrong, seen = [], set()
    for route in ROUTES:
        path = route.path.replace("{id}", job_id if route.path.startswith("/jobs/")
                                  else "no-such-id")
        for token, role in ROLE_OF_TOKEN.items():
            args = ["-X", route.method]
            if route.method in ("POST", "DELETE"):
                args += ["-H", "Content-Type: application/json", "-d", "{}"]
            # without a token: the .curlrc's admin token is not in this bridge's tokens file
            answer = curl(secured, path, *args, token=token)
            refused = answer.status if answer.status in (401, 403) else None
            seen.add(refused)
            if refused != expected_refusal(route.role, role):
                wrong.append((route.method, route.path, role, answer.status, answer.body[:120]))
    assert wrong == []
    assert seen == {None, 401, 403} and len(ROUTES) > 25

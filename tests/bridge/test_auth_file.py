"""The tokens file's every rule, read from real files as the bridge reads them at start
and on SIGHUP, and which hosts count as loopback for `auth: none`."""
from __future__ import annotations

import pytest
import yaml

from hypersdk.http_bridge.auth import (Authenticator, TokenFileError, is_loopback, load_tokens,
                                       token_digest)

GOOD = {"operator-token-0123456789": {"name": "otto", "role": "operator"}}


def write(tmp_path, text: str, mode: int = 0o600):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("text, mode, rule", [
    (yaml.safe_dump(GOOD), 0o644, "mode 0644 lets others read it; expected 0600 or 0640"),
    ("a: [unclosed", 0o600, "expected valid YAML"),
    ("- just\n- a list\n", 0o600, "expected a mapping of token -> {name, role}"),
    (yaml.safe_dump({"short": {"name": "otto", "role": "operator"}}), 0o600,
     "entry 1: expected a token of at least 16 characters or sha256:<64 hex digits>"),
    (yaml.safe_dump({"operator-token-0123456789": "otto"}), 0o600,
     "entry 1: expected {name: <string>, role: <role>}"),
    (yaml.safe_dump({"operator-token-0123456789": {"name": "otto", "role": "root"}}), 0o600,
     "entry 1: role expected one of viewer, operator, admin"),
    (yaml.safe_dump({"operator-token-0123456789": {"name": "x" * 129, "role": "viewer"}}),
     0o600, "entry 1: name expected 1-128 printable characters"),
], ids=["mode", "yaml", "list", "short", "entry", "role", "long-name"])
def test_each_broken_tokens_file_is_refused_naming_the_rule(tmp_path, text, mode, rule):
    with pytest.raises(TokenFileError) as err:
        load_tokens(write(tmp_path, text, mode))
    assert rule in str(err.value)
    assert "operator-token-0123456789" not in str(err.value)  # never the token itself


def test_an_unreadable_tokens_file_is_refused(tmp_path):
    with pytest.raises(TokenFileError, match="expected a readable tokens file"):
        load_tokens(tmp_path / "missing.yaml")


def test_tokens_are_kept_as_digests_and_a_stored_digest_is_taken_as_it_is(tmp_path):
    digest = token_digest("admin-token-0123456789abcdef")
    tokens = load_tokens(write(tmp_path, yaml.safe_dump(
        {**GOOD, digest: {"name": "ada", "role": "admin"}}), 0o640))
    assert set(tokens) == {token_digest("operator-token-0123456789"), digest}
    assert {(i.name, i.role) for i in tokens.values()} == {("otto", "operator"),
                                                          ("ada", "admin")}


def test_a_reload_keeps_the_tokens_in_use_when_the_file_broke_and_says_so(tmp_path):
    path = write(tmp_path, yaml.safe_dump(GOOD))
    tokens = load_tokens(path)
    [otto] = tokens.values()
    auth = Authenticator(tokens, path)
    path.write_text("a: [unclosed")
    assert auth.reload().startswith("kept the previous tokens: ")
    assert auth.enabled and auth.still_valid(otto)
    path.write_text(yaml.safe_dump({}))
    assert auth.reload() == "reloaded 0 API tokens"
    assert not auth.still_valid(otto)  # a removed token stops working at once
    assert Authenticator(None).reload() == "auth is off; nothing to reload"


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
    ("[::1]", True), ("10.0.0.1", False), ("0.0.0.0", False), ("::", False),
    ("example.com", False), ("localhost.example.com", False),
])
def test_only_loopback_hosts_count_as_loopback(host, loopback):
    assert is_loopback(host) is loopback

"""`make install DESTDIR=...` puts every file where Debian expects it; both installs import."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_make_install_with_destdir_places_every_file(tmp_path):
    destdir = tmp_path / "root"
    result = subprocess.run(["make", "-C", str(REPO), "install", f"DESTDIR={destdir}",
                             "PYTHON=/usr/bin/python3"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    expected = {
        "usr/share/dbus-1/system.d/org.hypersdk.HyperSDK1.conf": 0o644,
        "usr/share/dbus-1/system-services/org.hypersdk.HyperSDK1.service": 0o644,
        "usr/share/dbus-1/interfaces/org.hypersdk.HyperSDK1.Manager.xml": 0o644,
        "usr/share/dbus-1/interfaces/org.hypersdk.HyperSDK1.Job.xml": 0o644,
        "usr/lib/systemd/system/hypervisord.service": 0o644,
        "usr/lib/systemd/system/hypersdk-bridge.service": 0o644,
        "usr/share/polkit-1/actions/org.hypersdk.HyperSDK1.policy": 0o644,
        "usr/share/polkit-1/rules.d/50-hypersdk.rules": 0o644,
        "usr/lib/sysusers.d/hypersdk.conf": 0o644,
        "etc/hypersdk/config.yaml": 0o640,
        "usr/local/bin/hypervisord": None,
        "usr/local/bin/hypersdk-bridge": None,
        "usr/local/bin/hyperctl": None,
    }
    for relative, mode in expected.items():
        path = destdir / relative
        assert path.exists(), relative
        if mode is not None:
            assert path.stat().st_mode & 0o777 == mode, relative
    unit = (destdir / "usr/lib/systemd/system/hypervisord.service").read_text()
    assert "Type=notify" in unit and "ExecStart=/usr/local/bin/hypervisord" in unit
    # the first admin token is made on the machine (first start, or make install without
    # DESTDIR), never baked into a package tree
    bridge_unit = (destdir / "usr/lib/systemd/system/hypersdk-bridge.service").read_text()
    assert "ExecStartPre=+/usr/local/bin/hypersdk-bridge --init-tokens --config " \
        "/etc/hypersdk/config.yaml" in bridge_unit
    assert not (destdir / "etc/hypersdk/tokens.yaml").exists()
    assert "auth: \"token\"" in (destdir / "etc/hypersdk/config.yaml").read_text()
    assert (destdir / "usr/local/bin/hypervisord").read_text().startswith("#!/usr/bin/python3")
    # the installed (non-editable) package imports from the DESTDIR tree
    site = next(destdir.glob("usr/local/lib/python3*/dist-packages"))
    probe = subprocess.run(
        [sys.executable, "-I", "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); "
         "import hypersdk.service.daemon, hypersdk.tui, hypersdk.http_bridge, "
         "hypersdk.service.dbus.manager as m; print(m.__file__)", str(site)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(site))
    # the example config installed is one hypervisord accepts
    check = subprocess.run([sys.executable, "-m", "hypersdk.service.daemon", "--check-config",
                            "--config", str(destdir / "etc/hypersdk/config.yaml")],
                           capture_output=True, text=True,
                           env={**os.environ, "VSPHERE_PASSWORD": "x"})
    assert check.returncode == 0, check.stderr


def test_the_editable_install_maps_the_namespace_to_the_source_tree():
    import hypersdk.http_bridge
    import hypersdk.service
    import hypersdk.tui
    assert Path(hypersdk.service.__file__).parent == REPO / "service"
    assert Path(hypersdk.tui.__file__).parent == REPO / "tui"
    assert Path(hypersdk.http_bridge.__file__).parent == REPO / "http_bridge"


def test_dbus_policy_lets_only_root_own_the_name():
    from lxml import etree
    tree = etree.parse(str(REPO / "data/dbus-1/system.d/org.hypersdk.HyperSDK1.conf"))
    owners = tree.xpath("//allow[@own='org.hypersdk.HyperSDK1']/parent::policy")
    assert [p.get("user") for p in owners] == ["root"]

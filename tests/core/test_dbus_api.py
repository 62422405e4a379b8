"""The D-Bus API as users see it: busctl, gdbus, the introspection XML, signals."""
from __future__ import annotations

import json
import subprocess

from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, BusMonitor, busctl,
                           busctl_json, gdbus_call, submit, wait_for_status)
from ..support.introspection import documented, live
from ..support.system import MEMBER

def test_live_introspection_matches_the_documented_xml(system_bus, hypervisord):
    assert live(system_bus.address, MANAGER, MANAGER_IFACE) == documented(MANAGER_IFACE)
    path = submit(system_bus.address, {"steps": 1, "interval": 0.01}, kind="sleep").stdout.split()[1]
    path = json.loads(path)
    assert live(system_bus.address, path, JOB_IFACE) == documented(JOB_IFACE)


def test_root_is_an_object_manager_listing_jobs(system_bus, hypervisord):
    path = json.loads(submit(system_bus.address, {"steps": 1}, kind="sleep").stdout.split()[1])
    reply = busctl_json(system_bus.address, "call", BUS_NAME, "/org/hypersdk/HyperSDK1",
                        "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
    objects = reply["data"][0]
    assert MANAGER in objects and MANAGER_IFACE in objects[MANAGER]
    assert objects[path][JOB_IFACE]["Operation"]["data"] == "test"


def test_busctl_submit_then_gdbus_reads_properties_and_sees_changes(system_bus, hypervisord):
    with BusMonitor(system_bus.address) as monitor:
        reply = submit(system_bus.address, {"steps": 5, "interval": 0.1}, kind="sleep")
        path = json.loads(reply.stdout.split()[1])
        assert path.startswith("/org/hypersdk/HyperSDK1/jobs/job_")
        wait_for_status(system_bus.address, path, {"completed"})
        result = gdbus_call(system_bus.address, path, "org.freedesktop.DBus.Properties.Get",
                            JOB_IFACE, "BytesDone")
        assert result.returncode == 0, result.stderr
        assert f"<uint64 {5 << 20}>" in result.stdout
        monitor.wait_for(f"{path}: org.hypersdk.HyperSDK1.Job.Completed (true, '')")
    output = monitor.text
    assert "InterfacesAdded" in output
    assert f"{path}: org.freedesktop.DBus.Properties.PropertiesChanged" in output
    assert "'Status': <'completed'>" in output


def test_property_changes_are_coalesced(system_bus, hypervisord):
    """50 progress steps in ~0.5 s must not become 50 PropertiesChanged signals."""
    with BusMonitor(system_bus.address) as monitor:
        path = json.loads(submit(system_bus.address, {"steps": 50, "interval": 0.01},
                                 kind="sleep").stdout.split()[1])
        monitor.wait_for(f"{path}: org.hypersdk.HyperSDK1.Job.Completed")
    changes = [line for line in monitor.text.splitlines()
               if line.startswith(f"{path}: org.freedesktop.DBus.Properties.PropertiesChanged")]
    assert 2 <= len(changes) <= 12, changes


def test_bad_json_is_a_named_error_not_a_traceback(system_bus, hypervisord):
    result = busctl(system_bus.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob",
                    "sa{sv}", "{not json", "1", "kind", "s", "sleep", check=False)
    assert result.returncode != 0
    assert "definition: malformed JSON" in result.stderr
    result = submit(system_bus.address, {"steps": 1, "colour": "red"}, kind="sleep", check=False)
    assert "colour: unknown field" in result.stderr
    result = submit(system_bus.address, {}, kind="teleport", check=False)
    assert "unknown job kind 'teleport'" in result.stderr
    assert "Traceback" not in hypervisord.log()


def test_get_log_returns_lines_in_order(system_bus, hypervisord):
    path = json.loads(submit(system_bus.address, {"steps": 3, "interval": 0.01},
                             kind="sleep").stdout.split()[1])
    wait_for_status(system_bus.address, path, {"completed"})
    reply = busctl_json(system_bus.address, "call", BUS_NAME, path, JOB_IFACE, "GetLog",
                        "ta{sv}", "0", "0")
    messages = [line[3] for line in reply["data"][0]]
    assert messages == ["step 1", "step 2", "step 3"]


def test_pages_are_capped_and_bad_paging_options_named(system_bus, hypervisord):
    """No reply may outgrow the bus's message limit: GetLog and ListJobs pages are capped,
    and a log line longer than 4096 characters is cut saying by how much."""
    address = system_bus.address
    path = json.loads(submit(address, {"lines": 1200, "padding": 5000}, kind="logflood")
                      .stdout.split()[1])
    wait_for_status(address, path, {"completed"})
    lines = busctl_json(address, "call", BUS_NAME, path, JOB_IFACE, "GetLog", "ta{sv}", "0",
                        "0")["data"][0]
    assert len(lines) == 1000  # the default page is the maximum
    assert all(len(line[3]) < 4200 and line[3].endswith("more characters)") for line in lines)
    rest = busctl_json(address, "call", BUS_NAME, path, JOB_IFACE, "GetLog", "ta{sv}",
                       str(lines[-1][0]), "0")["data"][0]
    assert len(lines) + len(rest) == 1200
    for method_path, iface, method, signature, args in [
            (path, JOB_IFACE, "GetLog", "ta{sv}", ["0", "1", "limit", "u", "5000"]),
            (MANAGER, MANAGER_IFACE, "ListJobs", "a{sv}", ["1", "limit", "u", "1001"]),
            (MANAGER, MANAGER_IFACE, "ListJobs", "a{sv}", ["1", "limit", "s", "ten"])]:
        refused = busctl(address, "call", BUS_NAME, method_path, iface, method, signature,
                         *args, check=False)
        assert refused.returncode != 0 and "options.limit" in refused.stderr, refused.stderr


def test_an_error_quoting_nul_or_a_lone_surrogate_still_reaches_the_caller(system_bus,
                                                                           hypervisord):
    for key in ("x\\u0000", "y\\ud800"):
        result = busctl(system_bus.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob",
                        "sa{sv}", '{"%s": 1}' % key, "1", "kind", "s", "sleep", check=False,
                        timeout=10)
        assert result.returncode != 0 and "unknown field" in result.stderr
    assert busctl(system_bus.address, "status", BUS_NAME, check=False).returncode == 0


def test_parse_vmdk_reads_a_real_vmdk_for_a_member(system_bus, hypervisord, users, service_dir):
    disk = service_dir / "parse-me.vmdk"  # under the configured source roots
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=monolithicSparse", str(disk), "16M"], check=True)
    reply = busctl_json(system_bus.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE,
                        "ParseVmdk", "sa{sv}", str(disk), "0", user=MEMBER)
    parsed = json.loads(reply["data"][0])
    assert (parsed["path"], parsed["capacity_bytes"], parsed["create_type"]) == \
        (str(disk), 16 << 20, "monolithicSparse")
    [extent] = parsed["extents"]
    assert (extent["type"], extent["size_bytes"], extent["complete"]) == ("SPARSE", 16 << 20, True)
    assert parsed["complete"] and parsed["parent"] is None

"""The trust boundary, tried as a hostile member of group hypersdk would.

Real users, real polkitd, a real hypervisord on a private system bus, driven with
busctl as those users. The attacker owns a directory inside the configured roots
(`drop`) and plants links there; root's files must stay untouched and unread.
"""
from __future__ import annotations

import json
import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from hypersdk.service.disks.vmdk import (GD_CHUNK_ENTRIES, SparseHeader,
                                            grain_tables_complete)

from ..support.cli import (BUS_NAME, JOB_IFACE, MANAGER, MANAGER_IFACE, BusMonitor, busctl,
                           gdbus_call, gvariant_string, job_property, wait_for_status)
from ..support.system import MEMBER, OUTSIDER

ACCESS_DENIED = "Access denied"
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def drop(service_dir, users) -> Path:
    """The attacker's own directory, inside the test daemon's source and output roots."""
    directory = service_dir / "drop"
    directory.mkdir()
    os.chown(directory, users[MEMBER], users[MEMBER])
    return directory


@pytest.fixture
def victim(tmp_path) -> Path:
    """A root-only file outside every root, standing in for /var/spool/cron/crontabs/root."""
    path = Path("/root") / f"hypersdk-victim-{os.getpid()}-{tmp_path.name}"
    path.write_text("precious\n")
    path.chmod(0o600)
    yield path
    path.unlink()


def plant_link(target: Path | str, at: Path, owner: int) -> None:
    """A symlink the attacker made (owned by them, as `ln -s` run by them would be)."""
    os.symlink(target, at)
    os.lchown(at, owner, owner)


def call(address: str, method: str, body: dict | str, user: str = MEMBER, *options: str,
         check: bool = False) -> subprocess.CompletedProcess:
    text = body if isinstance(body, str) else json.dumps(body)
    return busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, method, "sa{sv}", text,
                  str(len(options) // 3), *options, user=user, check=check)


def job_of(reply: subprocess.CompletedProcess) -> str:
    assert reply.returncode == 0, reply.stderr
    return json.loads(reply.stdout.split()[1])


def make_vmdk(path: Path, owner: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "1M"], check=True)
    os.chown(path, owner, owner)
    return path


def test_convert_never_writes_through_links_planted_at_the_names_it_writes(
        system_bus, hypervisord, users, drop, victim):
    address, uid = system_bus.address, users[MEMBER]
    make_vmdk(drop / "disk.vmdk", uid)
    out = drop / "out"
    out.mkdir()
    os.chown(out, uid, uid)
    # every name the old code used (and the final one) points at root's file
    for name in ("disk.qcow2", ".disk.qcow2.partial", f".disk.qcow2.{hypervisord.process.pid}"
                 ".partial", ".hypersdk-staging"):
        plant_link(victim, out / name, uid)
    path = job_of(call(address, "Convert", {"source_path": str(drop / "disk.vmdk"),
                                            "output_path": str(out)}))
    assert wait_for_status(address, path, TERMINAL, 60) == "failed"
    assert "already exists" in job_property(address, path, "Error")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(  # nothing else left behind
        ["disk.qcow2", ".disk.qcow2.partial", f".disk.qcow2.{hypervisord.process.pid}.partial",
         ".hypersdk-staging"])


def test_an_output_directory_that_is_a_link_out_of_the_roots_is_refused(
        system_bus, hypervisord, users, drop):
    address = system_bus.address
    make_vmdk(drop / "disk.vmdk", users[MEMBER])
    plant_link("/etc", drop / "etc", users[MEMBER])
    path = job_of(call(address, "Convert", {"source_path": str(drop / "disk.vmdk"),
                                            "output_path": str(drop / "etc" / "cron.d")}))
    assert wait_for_status(address, path, TERMINAL, 60) == "failed"
    assert "through a symlink: refused" in job_property(address, path, "Error")
    assert not Path("/etc/cron.d/disk.qcow2").exists()


def test_root_only_files_are_never_read_as_sources(system_bus, hypervisord, users, drop):
    address, uid = system_bus.address, users[MEMBER]
    plant_link("/etc/shadow", drop / "shadow.vmdk", uid)
    plant_link("/etc", drop / "etc", uid)
    cases = [("/etc/shadow", "is outside the source roots"),
             (str(drop / "shadow.vmdk"), "is a symlink: refused"),
             (str(drop / "etc" / "shadow"), "through a symlink: refused"),
             (str(drop / ".." / ".." / "etc" / "shadow"), "must not contain '..'")]
    for source, rule in cases:
        reply = call(address, "Convert", {"source_path": source, "output_path": str(drop)})
        assert reply.returncode != 0 and "source_path" in reply.stderr, source
        assert rule in reply.stderr, (source, reply.stderr)
        reply = call(address, "ImportToKvm", {"vm_name": "x", "disk_path": source,
                                              "memory_mb": 64})
        assert reply.returncode != 0 and "disk_path" in reply.stderr and rule in reply.stderr


def test_parse_vmdk_says_nothing_about_files_outside_the_roots(system_bus, hypervisord, users,
                                                                drop):
    address, uid = system_bus.address, users[MEMBER]

    def parse(path: str) -> subprocess.CompletedProcess:
        return busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "ParseVmdk", "sa{sv}",
                      path, "0", user=MEMBER, check=False)

    existing, missing = parse("/etc/shadow"), parse("/etc/no-such-file-here")
    assert existing.returncode != 0 and missing.returncode != 0
    assert existing.stderr.replace("/etc/shadow", "X") == \
        missing.stderr.replace("/etc/no-such-file-here", "X")
    # an extent that is a link to root's file is not followed either
    (drop / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\n'
                                 'parentCID=ffffffff\ncreateType="monolithicFlat"\n'
                                 'RW 2048 FLAT "flat.bin" 0\n')
    plant_link("/etc/shadow", drop / "flat.bin", uid)
    reply = parse(str(drop / "d.vmdk"))
    assert reply.returncode != 0 and "symlink" in reply.stderr and "root:" not in reply.stderr


@pytest.mark.parametrize("name, content, rule", [
    ("empty.vmdk", b"", "is empty: not a disk image"),
    ("notes.vmdk", b"not a disk at all\n" * 100, "named like a .vmdk file but holds raw data"),
    ("disk.qcow2", b"\0" * 65536, "named like a .qcow2 file but holds raw data"),
], ids=["empty", "text", "zeros"])
def test_a_file_that_is_not_what_its_name_says_never_completes(
        system_bus, hypervisord, users, drop, name, content, rule):
    (drop / name).write_bytes(content)
    out = drop / "out"
    reply = call(system_bus.address, "Convert", {"source_path": str(drop / name),
                                                 "output_path": str(out)})
    if reply.returncode == 0:
        path = job_of(reply)
        assert wait_for_status(system_bus.address, path, TERMINAL, 60) == "failed"
        error = job_property(system_bus.address, path, "Error")
    else:
        error = reply.stderr
    assert rule in error
    assert not out.exists() or not any(out.iterdir())


def test_outsiders_read_neither_properties_nor_objects(system_bus, hypervisord, users):
    address = system_bus.address
    assert busctl(address, "get-property", BUS_NAME, MANAGER, MANAGER_IFACE, "Version",
                  user=MEMBER).returncode == 0
    for args in (("get-property", BUS_NAME, MANAGER, MANAGER_IFACE, "JobCounts"),
                 ("call", BUS_NAME, "/org/hypersdk/HyperSDK1",
                  "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")):
        reply = busctl(address, *args, user=OUTSIDER, check=False)
        assert reply.returncode != 0 and ACCESS_DENIED in reply.stderr, (args, reply.stderr)


def test_only_the_bridge_may_name_the_rest_user_a_call_is_for(system_bus, hypervisord, users):
    address = system_bus.address
    slow = {"steps": 100, "interval": 0.1}
    reply = gdbus_call(address, MANAGER, f"{MANAGER_IFACE}.SubmitJob",
                       gvariant_string(json.dumps(slow)),
                       "{'kind': <'sleep'>, 'requested_by': <'otto'>, "
                       "'requested_role': <'operator'>}", user=MEMBER)
    assert reply.returncode != 0 and "only hypersdk-bridge may act for a REST user" \
        in reply.stderr

    def as_rest(user: str, role: str, *call_args: str) -> subprocess.CompletedProcess:
        return busctl(address, "call", BUS_NAME, *call_args, "requested_by", "s", user,
                      "requested_role", "s", role, check=False)  # as root: the bridge's peer

    reply = as_rest("otto", "operator", MANAGER, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                    json.dumps(slow), "3", "kind", "s", "sleep")
    path = job_of(reply)
    assert job_property(address, path, "RequestedBy") == "rest:otto"
    reply = as_rest("anna", "operator", path, JOB_IFACE, "Cancel", "a{sv}", "2")
    assert reply.returncode != 0 and ACCESS_DENIED in reply.stderr  # cancel-job-other-user
    assert job_property(address, path, "Status") in ("pending", "running")
    reply = as_rest("otto", "operator", path, JOB_IFACE, "Cancel", "a{sv}", "2")
    assert reply.returncode == 0, reply.stderr
    reply = as_rest("otto", "overlord", MANAGER, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                    json.dumps(slow), "3", "kind", "s", "sleep")
    assert reply.returncode != 0 and "requested_role" in reply.stderr


@pytest.mark.parametrize("text, rule", [
    ("[" * 20000 + "]" * 20000, "nested deeper than 32 levels"),
    ('{"steps": ' + "9" * 5000 + "}", "unusable JSON"),
    ('{"steps": 1,', "malformed JSON"),
], ids=["deep", "huge-number", "truncated"])
def test_hostile_json_is_refused_naming_the_argument(system_bus, hypervisord, users, text, rule):
    reply = busctl(system_bus.address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob",
                   "sa{sv}", text, "1", "kind", "s", "sleep", user=MEMBER, check=False)
    assert reply.returncode != 0 and "definition" in reply.stderr and rule in reply.stderr
    assert "Traceback" not in reply.stderr


def test_a_header_claiming_a_huge_grain_directory_does_not_grow_memory(tmp_path):
    """8 TiB claimed with 8-sector grains: a 16 MiB grain directory (4 M entries), read in
    chunks of GD_CHUNK_ENTRIES; before, all of it and a list of 4 M ints were held."""
    capacity = (8 << 40) // 512
    header = SparseHeader(version=1, flags=0, capacity_sectors=capacity, grain_sectors=8,
                          descriptor_offset=0, descriptor_size=0, gtes_per_gt=512,
                          gd_offset=1, overhead_sectors=0, compress_algorithm=0)
    entries = -(-capacity // (512 * 8))
    path = tmp_path / "huge.vmdk"
    with open(path, "wb") as fh:
        fh.truncate(512 + entries * 4)  # a sparse, all-zero grain directory
    tracemalloc.start()
    try:
        with open(path, "rb") as fh:
            assert grain_tables_complete(fh, header, path.stat().st_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entries > 100 * GD_CHUNK_ENTRIES
    assert peak < 4 * GD_CHUNK_ENTRIES * 8 * 4, peak  # a few chunks' worth, not 16 MiB


def test_outsiders_do_not_receive_job_signals(system_bus, hypervisord, users):
    """Log lines and property changes carry definitions and results: the bus delivers
    them to members of group hypersdk, not to other users who subscribe."""
    address = system_bus.address
    with BusMonitor(address, MEMBER) as member, BusMonitor(address, OUTSIDER) as outsider:
        path = job_of(busctl(address, "call", BUS_NAME, MANAGER, MANAGER_IFACE, "SubmitJob",
                             "sa{sv}", json.dumps({"steps": 2, "interval": 0}), "1", "kind",
                             "s", "sleep"))
        member.wait_for("step 2")  # the member's copy of the last line
        wait_for_status(address, path, TERMINAL, 30)
    assert "LogLine" in member.text
    assert "LogLine" not in outsider.text and "PropertiesChanged" not in outsider.text

"""Fixtures for migration plans: a vSphere simulator whose 20 VMs sit on two hosts, two
port groups / networks and two datastores with real disks, and the targets in the real
libvirtd (qemu:///system): a libvirt network, a host bridge, two target directories."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from pathlib import Path

import libvirt
import pytest
from pyVim.connect import Disconnect

from hypersdk.client.names import BUS_NAME, PLAN_IFACE, plan_path
from tests.support.cli import busctl_json, run_hyperctl
from tests.support.libvirtd import ensure_system_libvirt, remove_domain
from tests.vcsim.harness import Simulator, place_vm

IMAGES_DIR = Path("/var/lib/libvirt/images")
NETWORKS = ("DC0_DVPG0", "VM Network")  # the simulator's port group and standard network
DATASTORES = ("LocalDS_0", "LocalDS_1")
HOSTS = {"DC0_H0_VM": "DC0_H0", "DC0_C0_RP0_VM": "DC0_C0_H0"}  # VM name prefix -> host
PER_HOST = 10
DISK_SIZE = 2 << 20
BIG_DISK_SIZE = 3 << 20  # the preflight group's: two of them do not fit a 4 MiB tmpfs


class PlanSim:
    """The simulator and where each of its VMs was placed (by group of the tests)."""

    def __init__(self, sim: Simulator, placed: dict[int, list[dict]]) -> None:
        self.sim = sim
        self.placed = placed  # index on each host -> [VM on DC0_H0, VM on DC0_C0_H0]

    def group(self, indexes) -> list[dict]:
        return [vm for index in indexes for vm in self.placed[index]]


@pytest.fixture(scope="module")
def plan_sim(vcsim_binary, tmp_path_factory) -> PlanSim:
    """VM i of each host: datastore LocalDS_<i % 2>, network NETWORKS[(i // 2) % 2],
    guest debian10_64Guest, one disk with real data, renamed hsdkplan-<random>-<n>.
    Indexes 0-5 (12 VMs) are for the big plan, 6-7 for the restart, 8-9 for preflight."""
    workdir = tmp_path_factory.mktemp("plan-vms")
    prefix = "hsdkplan-" + uuid.uuid4().hex[:6]
    with Simulator(vms=PER_HOST, datastores=2) as sim:
        si = sim.connect()
        placed: dict[int, list[dict]] = {}
        try:
            for index in range(PER_HOST):
                for source, host in HOSTS.items():
                    vm = place_vm(sim, si, f"{source}{index}",
                                  f"{prefix}-{index}-{host.lower()}",
                                  datastore=DATASTORES[index % 2],
                                  network=NETWORKS[(index // 2) % 2],
                                  guest_id="debian10_64Guest",
                                  size=BIG_DISK_SIZE if index >= 8 else DISK_SIZE,
                                  workdir=workdir, seed=index)
                    placed.setdefault(index, []).append({**vm, "host": host})
        finally:
            Disconnect(si)
        yield PlanSim(sim, placed)


class Targets:
    """Where plans put VMs: a libvirt network, a host bridge and two directories."""

    def __init__(self) -> None:
        self.uri = ensure_system_libvirt()
        self.conn = libvirt.open(self.uri)
        tag = uuid.uuid4().hex[:6]
        self.network = f"hsdkplan-{tag}"
        self.conn.networkDefineXML(f"<network><name>{self.network}</name></network>")
        self.bridge = f"hsdkbr{tag}"
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        self.dirs = [Path(tempfile.mkdtemp(prefix="hsdkplan-", dir=IMAGES_DIR))
                     for _ in range(2)]

    def network_map(self) -> dict:
        return {NETWORKS[0]: {"network": self.network}, NETWORKS[1]: {"bridge": self.bridge}}

    def close(self, domains: list[str]) -> None:
        for name in domains:
            remove_domain(self.conn, name)
        self.conn.networkLookupByName(self.network).undefine()
        subprocess.run(["ip", "link", "del", self.bridge], check=False)
        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self.conn.close()


@pytest.fixture
def targets(plan_sim):
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    made = Targets()
    yield made
    made.close([vm["name"] for vms in plan_sim.placed.values() for vm in vms])


def daemon_overrides(sim: Simulator, uri: str, **providers: dict) -> dict:
    """hypervisord's config for plan tests: the simulator as `vsphere`, the real libvirtd
    (TCG guests: nothing is booted), workers enough that only the plan's limits bind."""
    return {"providers": {"vsphere": sim.provider_settings(), **providers},
            "libvirt": {"uri": uri, "cpu_mode": "tcg"},
            "daemon": {"workers": 6},
            "export": {"concurrent_exports": 6}}


def hyperctl_json(address: str, *args: str, stdin: str | None = None,
                  expect: int = 0) -> dict:
    result = run_hyperctl(address, *args, stdin=stdin, timeout=120)
    assert result.returncode == expect, result.stderr + result.stdout
    return json.loads(result.stdout)


def create_plan(address: str, definition: dict) -> str:
    return hyperctl_json(address, "plan", "create", "-", stdin=json.dumps(definition))["plan_id"]


def plan_property(address: str, plan_id: str, name: str):
    return busctl_json(address, "get-property", BUS_NAME, plan_path(plan_id), PLAN_IFACE,
                       name)["data"]


def job_times(database: Path, job_ids: list[str]) -> dict[str, tuple[float, float, str]]:
    """(started_at, finished_at, error) of each job, as the store recorded them."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute(f"SELECT id, started_at, finished_at, error FROM jobs WHERE id IN "
                          f"({','.join('?' * len(job_ids))})", job_ids).fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def stored_job_count(database: Path) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals open at one moment (an end before a start at a tie)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most

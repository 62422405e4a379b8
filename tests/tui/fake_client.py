"""FakeConsoleClient: fixed data for deterministic snapshots of the console.

The console is tested against the real service in test_console.py; snapshots need
the same picture every run, so they get a client whose mirror never changes.
"""
from __future__ import annotations

import asyncio

from hypersdk.tui.client import ClientEvent, JobState, LogLine, Mirror

NOW = 1_790_000_000.0  # the fixed clock of the snapshots


def _job(number: int, status: str, vm: str, **props) -> JobState:
    job_id = f"job-{number:04x}"
    base = {"Id": job_id, "Operation": "export", "Status": status, "VM": vm,
            "Provider": "vsphere", "Stage": "", "Progress": 0.0, "ProgressValid": False,
            "BytesDone": 0, "BytesTotal": 0, "Rate": 0, "ExpectedEndTime": 0,
            "CreatedTime": int((NOW - 1000 + number) * 1e6), "Error": "", "Attempts": 1,
            "Definition": "{}", "Result": "{}"}
    base.update(props)
    return JobState("/org/hypersdk/HyperSDK1/jobs/" + job_id.replace("-", "_"), base)


def fixed_mirror() -> Mirror:
    jobs = [
        _job(1, "completed", "web01", Progress=1.0, ProgressValid=True,
             BytesDone=8 << 30, BytesTotal=8 << 30),
        _job(2, "running", "db01", Stage="download disk 2/3", Progress=0.42, ProgressValid=True,
             BytesDone=21 << 30, BytesTotal=50 << 30, Rate=180 << 20,
             ExpectedEndTime=int((NOW + 165) * 1e6)),
        _job(3, "failed", "mail01", Error="datastore1: disk file not found"),
        _job(4, "pending", "app02"),
        _job(5, "cancelled", "test03", Progress=0.1, ProgressValid=True),
    ]
    return Mirror(service_up=True, version="1.0.0",
                  capabilities={"providers": [{"name": "vsphere", "type": "vsphere",
                                               "configured": True, "available": True}],
                                "features": ["hyper2kvm_daemon_mode", "direct_pipeline"]},
                  job_counts={"pending": 1, "running": 1, "completed": 1, "failed": 1,
                              "cancelled": 1},
                  jobs={job.id: job for job in jobs})


FIXED_VMS = [
    {"identifier": "vm-101", "name": "web01", "provider": "vsphere", "power_state": "poweredOn",
     "path": "/DC1/vm/web01", "guest_os": "ubuntu64Guest", "cpus": 2, "memory_mb": 4096,
     "firmware": "uefi", "secure_boot": True, "datacenter": "DC1", "disk_bytes": 40 << 30,
     "disks": [{"key": "disk-2000", "label": "Hard disk 1", "capacity_bytes": 40 << 30,
                "controller": "scsi", "location": "[datastore1] web01/web01.vmdk"}],
     "nics": [{"key": "nic-4000", "mac": "00:50:56:01:02:03", "network": "VM Network",
               "adapter": "vmxnet3"}]},
    {"identifier": "vm-102", "name": "db01", "provider": "vsphere", "power_state": "poweredOff",
     "path": "/DC1/vm/db01", "guest_os": "rhel9_64Guest", "cpus": 8, "memory_mb": 32768,
     "firmware": "bios", "datacenter": "DC1", "disk_bytes": 500 << 30,
     "disks": [{"key": "disk-2000", "label": "Hard disk 1", "capacity_bytes": 100 << 30,
                "controller": "scsi"},
               {"key": "disk-2001", "label": "Hard disk 2", "capacity_bytes": 400 << 30,
                "controller": "scsi"}], "nics": []},
    {"identifier": "vm-201", "name": "mail01", "provider": "vsphere",
     "power_state": "suspended", "path": "/DC2/vm/mail01", "guest_os": "windows2019srv_64Guest",
     "cpus": 4, "memory_mb": 8192, "firmware": "uefi", "datacenter": "DC2",
     "disk_bytes": 120 << 30, "disks": [], "nics": []},
]

FIXED_LOG = [LogLine(i, int((NOW - 60 + i) * 1e6), "info", f"step {i}") for i in range(1, 6)]


class FakeConsoleClient:
    """A client whose mirror is fixed; method calls are recorded, never sent anywhere."""

    bus_spec = "system"

    def __init__(self, mirror: Mirror | None = None) -> None:
        self.mirror = mirror or fixed_mirror()
        self.calls: list[tuple] = []
        self.answers: dict[str, object] = {}  # call_object's answer, by member
        self._listeners = []

    @property
    def connected(self) -> bool:
        return True

    def subscribe(self, listener):
        self._listeners.append(listener)
        return lambda: None

    def emit(self, event: ClientEvent) -> None:
        for listener in self._listeners:
            listener(event)

    async def run(self) -> None:
        await asyncio.Event().wait()

    def close(self) -> None:
        pass

    async def recent_jobs(self, count: int = 500) -> dict[str, JobState]:
        """Manager.ListJobRecords: nothing stored besides the mirror."""
        self.calls.append(("recent_jobs", count))
        return {}

    async def list_vms(self, provider: str, vm_filter=None) -> list[dict]:
        self.calls.append(("list_vms", provider))
        return [dict(vm) for vm in FIXED_VMS]

    async def follow_log(self, job_id: str, follow: bool = True):
        for line in FIXED_LOG:
            yield line

    async def submit(self, definition: dict, kind: str = "export") -> str:
        self.calls.append(("submit", definition, kind))
        return "job-ffff"

    async def cancel(self, job_id: str) -> None:
        self.calls.append(("cancel", job_id))

    async def retry(self, job_id: str) -> str:
        self.calls.append(("retry", job_id))
        return "job-fffe"

    async def call_object(self, path: str, interface: str, member: str, signature: str = "",
                          *args):
        self.calls.append(("call_object", path, interface, member, *args))
        return self.answers.get(member)

"""A fake HttpNfcLease: vcsim's own lease cannot be made to stall, report a manifest or
be watched call by call, so the lease tests and the overlap tests drive this one."""
from __future__ import annotations

from types import SimpleNamespace


class FakeNfcLease:
    """A test double for HttpNfcLease: state, info and the three lease calls, recorded."""

    def __init__(self, urls: list[str], lease_timeout: int = 4,
                 sha256: list[str] | None = None) -> None:
        self.sha256 = sha256 or []
        self.polls = 0
        self.calls: list[tuple] = []
        self.error = None
        self.info = SimpleNamespace(
            leaseTimeout=lease_timeout,
            deviceUrl=[SimpleNamespace(url=url, disk=True, key=f"/vm/disk{i}",
                                       targetId=f"disk-{i}.vmdk") for i, url in enumerate(urls)])

    @property
    def state(self) -> str:
        self.polls += 1
        return "initializing" if self.polls == 1 else "ready"

    def HttpNfcLeaseProgress(self, percent: int) -> None:
        self.calls.append(("progress", percent))

    def HttpNfcLeaseGetManifest(self) -> list:
        self.calls.append(("manifest",))
        return [SimpleNamespace(key=device.key, checksumType="sha256", checksum=digest, sha1=None)
                for device, digest in zip(self.info.deviceUrl, self.sha256)]

    def HttpNfcLeaseComplete(self) -> None:
        self.calls.append(("complete",))

    def HttpNfcLeaseAbort(self, fault=None) -> None:
        self.calls.append(("abort",))

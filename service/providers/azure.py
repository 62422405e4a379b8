"""Azure VMs as a source (azure-mgmt-compute, async client): discovery, details, export.

Export reads each managed disk through a SAS URL: it grants read access to the disk
itself when the VM is deallocated (and stays so), otherwise to a snapshot of the
disk made for the export: a disk attached to a running VM cannot be granted, and
with `shutdown_vm` + `restore_power_state` the VM is deallocated, snapshotted and
started again before the download, so it is down only for the snapshots. The fixed VHD behind the SAS URL is downloaded by `azure_blob.py` (only
the page ranges that hold data, in parallel ranged reads, into a sparse file,
sha256) and its footer checked. Access is revoked and our snapshots deleted at the
end whatever happens: success, failure or cancel.

Credentials: `tenant_id` + `client_id` + `client_secret_file` (mode 0600) for a
service principal, else azure-identity's DefaultAzureCredential chain (environment,
managed identity, Azure CLI). `arm_endpoint` and `ca_file` point at another cloud
(Azure Stack Hub, a test server). SAS URLs are secrets: never logged or returned.
"""
from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any, Awaitable

from ..config_schema import Field
from ..errors import Failed, HyperSDKError, InvalidArgument, NotFound, Retryable, Unavailable
from .azure_blob import download_disk_blob
from .azure_vhd import check_fixed_vhd
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider, require_extra
from .cleanup import Cleanups, recorded_even_if_cancelled
from .common import OutputFiles, check_filter, closest, private_file_rule, provider_options, \
    read_private_file, shutdown_timeout
from .sparse import SparseImage

GIB = 1024 ** 3
SDK_MODULES = ("azure.mgmt.compute", "azure.identity", "azure.storage.blob")
FILTER_KEYS = ("resource_group", "tags", "name", "power_state")
POWER_STATES = {"PowerState/running": "poweredOn", "PowerState/starting": "poweredOn",
                "PowerState/stopped": "poweredOff", "PowerState/deallocated": "poweredOff",
                "PowerState/deallocating": "poweredOff", "PowerState/stopping": "poweredOff"}
DEALLOCATED = "PowerState/deallocated"
DEFAULT_SHUTDOWN_TIMEOUT = 600.0
NETWORK_API_VERSION = "2023-09-01"


def _https_url(value: str) -> str | None:
    return None if value.startswith(("https://", "http://")) else "an https:// URL"


CONFIG_SCHEMA = {
    "subscription_id": Field("str"),
    "resource_group": Field("str", "", doc="default resource group for names without one"),
    "tenant_id": Field("str", ""),
    "client_id": Field("str", ""),
    "client_secret_file": Field("str", "", check=private_file_rule, secret=True),
    "arm_endpoint": Field("str", "https://management.azure.com", check=_https_url),
    "ca_file": Field("str", "", doc="CA bundle for a private cloud's TLS certificates"),
    "access_duration": Field("duration", 4 * 3600.0, minimum=60,
                             doc="how long a SAS URL granted for a download stays valid"),
    "poll_interval": Field("duration", 5.0, doc="how often long-running operations are polled"),
    "parallel_ranges": Field("int", 8, minimum=1, doc="ranged reads of a disk blob in flight"),
}


def _http_error(exc: Any, what: str) -> HyperSDKError:
    """An ARM error answer by its HTTP status."""
    if exc.status_code == 404:
        return NotFound(f"{what}: not found ({_first_line(exc)})")
    if exc.status_code == 429 or (exc.status_code or 0) >= 500:
        return Retryable(f"{what}: Azure answered HTTP {exc.status_code} ({_first_line(exc)})")
    if exc.status_code == 403:
        return Unavailable(f"{what}: Azure refused the permission ({_first_line(exc)})")
    return Failed(f"{what}: HTTP {exc.status_code} ({_first_line(exc)})")


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return str(text).strip().splitlines()[0][:300] if text else type(exc).__name__


def parse_resource_id(resource_id: str) -> tuple[str, str]:
    """(resource group, name) from an ARM id such as /subscriptions/s/resourceGroups/rg/.../disks/d."""
    parts = resource_id.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    if "resourcegroups" not in lowered or len(parts) < 2:
        raise InvalidArgument("resource id", f"an ARM resource id, not {resource_id!r}")
    return parts[lowered.index("resourcegroups") + 1], parts[-1]


class AzureProvider(Provider):
    kind = "azure"

    def __init__(self, name: str, settings: dict, config: Any, *, credential: Any = None) -> None:
        """`credential`: an azure-identity async credential to use instead of the configured one."""
        super().__init__(name, settings, config)
        self._credential = credential
        self._own_credential = credential is None
        self._client: Any = None
        self._sizes: dict[str, dict[str, dict]] = {}

    # --- client ----------------------------------------------------------------------

    def _make_credential(self) -> Any:
        identity = require_extra("azure.identity.aio", "azure")
        if self.settings.get("client_secret_file"):
            field = f"providers.{self.name}.client_secret_file"
            if not (self.settings.get("tenant_id") and self.settings.get("client_id")):
                raise InvalidArgument(field, "needs tenant_id and client_id as well")
            secret = read_private_file(self.settings["client_secret_file"], field)
            return identity.ClientSecretCredential(self.settings["tenant_id"],
                                                   self.settings["client_id"], secret)
        return identity.DefaultAzureCredential()

    def client(self) -> Any:
        """The shared async ComputeManagementClient."""
        if self._client is None:
            compute = require_extra("azure.mgmt.compute.aio", "azure")
            if self._credential is None:
                self._credential = self._make_credential()
            endpoint = self.settings.get("arm_endpoint", "https://management.azure.com").rstrip("/")
            kwargs: dict[str, Any] = {
                "base_url": endpoint, "credential_scopes": [endpoint + "/.default"],
                "polling_interval": float(self.settings.get("poll_interval", 5.0)),
                "retry_total": self.retry_policy.retries}
            if self.settings.get("ca_file"):
                kwargs["connection_verify"] = self.settings["ca_file"]
            self._client = compute.ComputeManagementClient(
                self._credential, self.settings["subscription_id"], **kwargs)
        return self._client

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """azure-core's exceptions as the service's errors, the message saying what failed."""
        errors = require_extra("azure.core.exceptions", "azure")
        if isinstance(exc, errors.ClientAuthenticationError):
            return Unavailable(f"{what}: Azure refused the credentials ({_first_line(exc)})")
        if isinstance(exc, errors.ResourceNotFoundError):
            return NotFound(f"{what}: not found ({_first_line(exc)})")
        if isinstance(exc, errors.HttpResponseError):
            return _http_error(exc, what)
        if isinstance(exc, (errors.ServiceRequestError, errors.ServiceResponseError)):
            return Retryable(f"{what}: cannot reach Azure ({type(exc).__name__})")
        if isinstance(exc, errors.AzureError):
            return Failed(f"{what}: {_first_line(exc)}")
        return None

    async def _lro(self, what: str, begin: Awaitable[Any]) -> Any:
        """Start a long-running operation and wait for its result."""
        async def run() -> Any:
            poller = await begin
            return await poller.result()
        return await self.guard(what, run())

    async def _collect(self, what: str, pager: Any) -> list[Any]:
        async def run() -> list[Any]:
            return [item async for item in pager]
        return await self.guard(what, run())

    # --- discovery -------------------------------------------------------------------

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        tags = vm_filter.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise InvalidArgument("filter.tags", "a mapping of tag names to values")
        wanted_state = vm_filter.get("power_state")
        if wanted_state and wanted_state not in ("poweredOn", "poweredOff", "unknown"):
            raise InvalidArgument("filter.power_state", "one of poweredOn, poweredOff, unknown")
        group = vm_filter.get("resource_group") or self.settings.get("resource_group")
        client = self.client()
        pager = (client.virtual_machines.list(group, expand="instanceView") if group
                 else client.virtual_machines.list_all(expand="instanceView"))
        vms = await self._collect(f"azure provider {self.name!r}: listing VMs", pager)
        result = []
        for vm in vms:
            vm_tags = vm.get("tags") or {}
            if any(vm_tags.get(k) != v for k, v in tags.items()):
                continue
            if vm_filter.get("name") and vm["name"] != vm_filter["name"]:
                continue
            info = await self._vm_info(vm)
            if wanted_state and info.power_state != wanted_state:
                continue
            result.append(info)
        return result

    async def get_vm(self, identifier: str) -> VMInfo:
        group, name = self._split_identifier(identifier)
        try:
            vm = await self.guard(f"azure provider {self.name!r}: VM {identifier!r}",
                                   self.client().virtual_machines.get(group, name,
                                                                      expand="instanceView"))
        except NotFound:
            try:
                names = [v["name"] for v in await self._collect(
                    "listing VMs", self.client().virtual_machines.list(group))]
            except NotFound:  # the resource group itself does not exist
                names = []
            raise NotFound(f"azure provider {self.name!r}: no VM {name!r} in resource group "
                           f"{group!r}{closest(name, names)}") from None
        return await self._vm_info(vm)

    def _split_identifier(self, identifier: str) -> tuple[str, str]:
        if identifier.startswith("/subscriptions/"):
            return parse_resource_id(identifier)
        group, _, name = identifier.rpartition("/")
        group = group or self.settings.get("resource_group", "")
        if not group or not name:
            raise InvalidArgument("vm_identifier", "RESOURCE_GROUP/VM_NAME, an ARM id, or a VM "
                                                   "name with resource_group set in the config")
        return group, name

    async def _vm_size(self, location: str, size: str) -> dict:
        if location not in self._sizes:
            sizes = await self._collect(f"listing VM sizes in {location}",
                                        self.client().virtual_machine_sizes.list(location))
            self._sizes[location] = {s["name"]: s for s in sizes}
        return self._sizes[location].get(size, {})

    async def _vm_info(self, vm: Any) -> VMInfo:
        props = vm.get("properties") or {}
        group, _ = parse_resource_id(vm["id"])
        storage = props.get("storageProfile") or {}
        size = await self._vm_size(vm["location"], (props.get("hardwareProfile") or {}).get("vmSize", ""))
        os_disk = storage.get("osDisk") or {}
        boot_disk, generation = await self._disk_info(os_disk, "os disk", 1)
        disks = [boot_disk]
        for data_disk in sorted(storage.get("dataDisks") or [], key=lambda d: d.get("lun", 0)):
            info, _ = await self._disk_info(data_disk, f"data disk lun {data_disk.get('lun', 0)}", None)
            disks.append(info)
        codes = [s.get("code", "") for s in (props.get("instanceView") or {}).get("statuses", [])]
        power = next((c for c in codes if c.startswith("PowerState/")), "")
        uefi = (props.get("securityProfile") or {}).get("uefiSettings") or {}
        tags = vm.get("tags") or {}
        return VMInfo(
            identifier=f"{group}/{vm['name']}", name=vm["name"], provider=self.name,
            power_state=POWER_STATES.get(power, "unknown"), path=vm["id"],
            uuid=props.get("vmId", ""), guest_os=os_disk.get("osType", ""),
            cpus=int(size.get("numberOfCores", 1)), memory_mb=int(size.get("memoryInMB", 0)),
            firmware="uefi" if generation == "V2" or uefi else "bios",
            secure_boot=bool(uefi.get("secureBootEnabled")), datacenter=vm["location"],
            tags=[f"{k}={v}" for k, v in sorted(tags.items())], disks=disks,
            nics=[await self._nic_info(n["id"])
                  for n in (props.get("networkProfile") or {}).get("networkInterfaces", [])],
            extra={"resource_group": group, "power_code": power,
                   "vm_size": (props.get("hardwareProfile") or {}).get("vmSize", "")})

    async def _disk_info(self, ref: dict, label: str,
                         boot_order: int | None) -> tuple[DiskInfo, str]:
        """The disk behind a VM's disk reference, and its Hyper-V generation (V2 = UEFI)."""
        disk_id = (ref.get("managedDisk") or {}).get("id")
        if not disk_id:  # a legacy unmanaged disk: listed, refused by export_disks
            return (DiskInfo(key=ref.get("name", label), label=label,
                             capacity_bytes=int(ref.get("diskSizeGB") or 0) * GIB,
                             location=(ref.get("vhd") or {}).get("uri", ""),
                             boot_order=boot_order), "")
        group, name = parse_resource_id(disk_id)
        disk = await self.guard(f"reading disk {name}", self.client().disks.get(group, name))
        props = disk.get("properties") or {}
        capacity = int(props.get("diskSizeBytes") or int(props.get("diskSizeGB", 0)) * GIB)
        return (DiskInfo(key=name, label=label, capacity_bytes=capacity, location=disk_id,
                         boot_order=boot_order),
                props.get("hyperVGeneration", ""))

    async def _nic_info(self, nic_id: str) -> NicInfo:
        """MAC and subnet of a network interface, read from ARM through the compute client's
        pipeline (no azure-mgmt-network needed); without read access to it, no MAC."""
        name = parse_resource_id(nic_id)[1]
        rest = require_extra("azure.core.rest", "azure")
        request = rest.HttpRequest("GET", nic_id, params={"api-version": NETWORK_API_VERSION})

        async def fetch() -> dict:
            response = await self.client().send_request(request)
            response.raise_for_status()
            return response.json()
        try:
            data = await self.guard(f"reading network interface {name}", fetch())
        except (NotFound, Unavailable):
            return NicInfo(key=name, mac="", network="")
        props = data.get("properties") or {}
        configs = props.get("ipConfigurations") or [{}]
        subnet = ((configs[0].get("properties") or {}).get("subnet") or {}).get("id", "")
        network = subnet.rpartition("/virtualNetworks/")[2].replace("/subnets/", "/")
        return NicInfo(key=name, mac=props.get("macAddress", "").replace("-", ":").lower(),
                       network=network)

    # --- export ----------------------------------------------------------------------

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        provider_options(options.extra, ())  # the azure provider takes none
        timeout = shutdown_timeout(options.extra, DEFAULT_SHUTDOWN_TIMEOUT)
        vm = await self.get_vm(identifier)
        unmanaged = [d.key for d in vm.disks if not d.location.startswith("/subscriptions/")]
        if unmanaged:
            raise InvalidArgument("vm_identifier", f"{vm.name} has unmanaged disks "
                                  f"({', '.join(unmanaged)}); only managed disks can be exported")
        group = vm.extra["resource_group"]
        vms = self.client().virtual_machines
        deallocated_by_us = False
        if options.shutdown_vm and vm.extra["power_code"] != DEALLOCATED:
            sink.log(f"deallocating VM {vm.name}")
            try:
                await asyncio.wait_for(self._lro(f"deallocating VM {vm.name}",
                                                 vms.begin_deallocate(group, vm.name)), timeout)
            except asyncio.TimeoutError:
                raise Failed(f"VM {vm.name} was not deallocated within {timeout:g} s "
                             "(options.shutdown_timeout)") from None
            deallocated_by_us = True
        restart = deallocated_by_us and options.restore_power_state
        # a deallocated VM's disks can be granted directly; to restart the VM before the
        # download (or to read a running VM) the disks are snapshotted first
        direct = vm.extra["power_code"] == DEALLOCATED or (deallocated_by_us and not restart)
        output = OutputFiles(target_dir)
        granted: list[tuple[str, str, str]] = []
        made: list[tuple[str, str]] = []
        exported: list[ExportedDisk] = []
        starting = f"starting VM {vm.name} again"
        async with Cleanups(sink) as cleanups:
            if restart:
                cleanups.add(starting, lambda: self._start(vm, sink))
            cleanups.add("revoking our grants and deleting our snapshots",
                         lambda: self._release(granted, made, sink))
            try:
                sources = [("disks", *parse_resource_id(disk.location)) if direct
                           else await self._snapshot(vm, disk, made, sink) for disk in vm.disks]
                await cleanups.run_early(starting)  # the snapshots hold the disks now
                for disk, source in zip(vm.disks, sources):
                    access_url = await self._grant(source, granted, sink)
                    exported.append(await self._download(access_url, disk, target_dir, options,
                                                         sink))
                    output.add(exported[-1].path)
                    await self._revoke(source, granted, sink)
            except BaseException:
                output.discard()
                raise
        return vm, exported

    async def _start(self, vm: VMInfo, sink: ExportSink) -> None:
        sink.log(f"starting VM {vm.name} again")
        await self._lro(f"starting VM {vm.name}", self.client().virtual_machines.begin_start(
            vm.extra["resource_group"], vm.name))

    async def _release(self, granted: list[tuple[str, str, str]], made: list[tuple[str, str]],
                       sink: ExportSink) -> None:
        """Revoke every grant still open and delete the snapshots we made."""
        for source in list(granted):
            await self._revoke(source, granted, sink)
        for snapshot in made:
            await self._delete_snapshot(snapshot, sink)

    async def _snapshot(self, vm: VMInfo, disk: DiskInfo, made: list[tuple[str, str]],
                        sink: ExportSink) -> tuple[str, str, str]:
        group, disk_name = parse_resource_id(disk.location)
        name = f"{disk_name}-hypersdk-{secrets.token_hex(4)}"[-80:]
        body = {"location": vm.datacenter,
                "tags": {"hypersdk:vm": vm.name, "hypersdk:disk": disk_name},
                "properties": {"creationData": {"createOption": "Copy",
                                                "sourceResourceId": disk.location},
                               "incremental": False}}
        sink.log(f"snapshotting disk {disk_name} as {name}")
        await recorded_even_if_cancelled(
            self._lro(f"snapshotting disk {disk_name}",
                      self.client().snapshots.begin_create_or_update(group, name, body)),
            lambda _snapshot: made.append((group, name)))
        return ("snapshots", group, name)

    def _operations(self, kind: str) -> Any:
        return self.client().disks if kind == "disks" else self.client().snapshots

    async def _grant(self, source: tuple[str, str, str], granted: list, sink: ExportSink) -> str:
        kind, group, name = source
        duration = int(float(self.settings.get("access_duration", 4 * 3600.0)))
        body = {"access": "Read", "durationInSeconds": duration}
        granted.append(source)  # revoke even if the grant's outcome is unknown
        result = await self._lro(f"granting read access to {kind[:-1]} {name}",
                                 self._operations(kind).begin_grant_access(group, name, body))
        sink.log(f"read access to {kind[:-1]} {name} granted for {duration} s")
        access_url = (result or {}).get("accessSAS") or ""
        if not access_url:
            raise Failed(f"granting access to {kind[:-1]} {name}: Azure returned no SAS URL")
        return access_url

    async def _revoke(self, source: tuple[str, str, str], granted: list, sink: ExportSink) -> None:
        """Best effort: a failed revoke is logged (the grant expires on its own), never raised."""
        kind, group, name = source
        if source in granted:
            granted.remove(source)
        try:
            await self._lro(f"revoking access to {kind[:-1]} {name}",
                            self._operations(kind).begin_revoke_access(group, name))
            sink.log(f"read access to {kind[:-1]} {name} revoked")
        except HyperSDKError as exc:
            sink.log(f"could not revoke access to {kind[:-1]} {name}: {exc}", "warning")

    async def _delete_snapshot(self, snapshot: tuple[str, str], sink: ExportSink) -> None:
        group, name = snapshot
        try:
            await self._lro(f"deleting snapshot {name}",
                            self.client().snapshots.begin_delete(group, name))
            sink.log(f"snapshot {name} deleted")
        except HyperSDKError as exc:
            sink.log(f"could not delete snapshot {name}: {exc}", "warning")

    async def _download(self, access_url: str, disk: DiskInfo, target_dir: Path,
                        options: ExportOptions, sink: ExportSink) -> ExportedDisk:
        target = target_dir / f"{disk.key}.vhd"
        size, digest, read = await self.guard(
            f"downloading disk {disk.key}",
            download_disk_blob(access_url, lambda size: SparseImage(target, size),
                               chunk_size=options.chunk_size,
                               parallel=int(self.settings.get("parallel_ranges", 8)),
                               max_retries=options.max_retries, sink=sink,
                               ca_file=self.settings.get("ca_file", "")))
        sink.log(f"{disk.key}: {read} of {size} bytes held data and were downloaded")
        try:
            capacity = await asyncio.to_thread(check_fixed_vhd, target)
        except Failed:
            target.unlink(missing_ok=True)
            raise
        if disk.capacity_bytes and capacity != disk.capacity_bytes:
            target.unlink(missing_ok=True)
            raise Failed(f"{target.name}: the VHD holds {capacity} bytes of disk, Azure reports "
                         f"{disk.capacity_bytes}")
        return ExportedDisk(path=target, format="vhd", capacity_bytes=capacity, file_bytes=size,
                            sha256=digest, boot_order=disk.boot_order, label=disk.label,
                            key=disk.key)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._own_credential and self._credential is not None:
            await self._credential.close()
            self._credential = None


PROVIDER_CLASS = AzureProvider

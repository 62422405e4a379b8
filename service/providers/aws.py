"""AWS EC2 as a source of VMs (boto3): discovery, details, export through EBS snapshots.

Export snapshots each EBS volume of the instance (stopping it first when asked, and
starting it again as soon as the snapshots are complete when restore_power_state),
waits for the snapshots, reads them with the EBS direct APIs into sparse raw images
(`aws_ebs.py`) and deletes the snapshots it made unless the job keeps them. No S3
bucket or export role is needed.

Export options (`options.provider_options` of the job, `ExportOptions.extra` here), all optional, keyed by volume id where per volume:
- `snapshot_ids`: read these existing snapshots instead of making new ones (never
  deleted by us), e.g. an AWS Backup recovery point;
- `base_snapshot_ids` + `base_images`: an incremental export; only the blocks that
  changed since the base snapshot are read, on top of a copy of `base_images[vol]`
  (the raw image exported from that base);
- `keep_snapshots`: keep the snapshots we made, to serve as the next base;
and, from the job's `options.shutdown_timeout`, the seconds to wait for the instance to
stop (and start again).
The snapshot read for each volume is reported in `VMInfo.extra["snapshot_ids"]`.

Credentials: `access_key_id` + `secret_access_key_file` (mode 0600), or `profile`,
or boto3's standard chain (environment, shared files, instance role).
"""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Callable

from ..config_schema import Field
from ..errors import Failed, HyperSDKError, InvalidArgument, NotFound, Retryable, Unavailable
from .aws_ebs import SnapshotRead, read_snapshot
from .aws_warm import ROUND_TAG, AwsWarmSource
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider, require_extra
from .cleanup import Cleanups, recorded_even_if_cancelled
from .common import (OutputFiles, check_filter, closest, poll_until, private_file_rule,
                     provider_options, read_private_file, shutdown_timeout)

GIB = 1024 ** 3
SDK_MODULES = ("boto3",)
FILTER_KEYS = ("tags", "state", "region", "name")
EXTRA_KEYS = ("snapshot_ids", "base_snapshot_ids", "base_images", "keep_snapshots")
DEFAULT_SHUTDOWN_TIMEOUT = 600.0
AUTH_ERROR_CODES = {"AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException",
                    "SignatureDoesNotMatch", "ExpiredToken", "InvalidAccessKeyId",
                    "AccessDeniedException", "UnauthorizedOperation", "AccessDenied"}
THROTTLE_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded",
                  "RequestThrottledException", "TooManyRequestsException"}
EC2_STATES = ("pending", "running", "shutting-down", "terminated", "stopping", "stopped")
POWER_STATES = {"running": "poweredOn", "stopped": "poweredOff", "stopping": "poweredOff"}


def _url_or_empty(value: str) -> str | None:
    return None if not value or value.startswith(("http://", "https://")) else "an http:// or https:// URL"


CONFIG_SCHEMA = {
    "region": Field("str", "us-east-1", doc="default region for listing and export"),
    "endpoint_url": Field("str", "", check=_url_or_empty, doc="override the AWS endpoints (tests)"),
    "profile": Field("str", "", doc="a profile of the shared AWS config files"),
    "access_key_id": Field("str", ""),
    "secret_access_key_file": Field("str", "", check=private_file_rule, secret=True),
    "parallel_blocks": Field("int", 16, minimum=1, doc="GetSnapshotBlock calls in flight"),
    "poll_interval": Field("duration", 5.0, doc="how often to look at snapshots and power state"),
    "snapshot_timeout": Field("duration", 7200.0, doc="how long a snapshot may take"),
}


class AwsProvider(Provider):
    kind = "aws"
    warm_unsupported = ""  # EBS snapshots read with the EBS direct APIs: aws_warm.py

    def __init__(self, name: str, settings: dict, config: Any) -> None:
        super().__init__(name, settings, config)
        self._session: Any = None
        self._clients: dict[tuple[str, str], Any] = {}
        self._clients_lock = threading.Lock()
        self._instance_types: dict[tuple[str, str], dict] = {}

    # --- clients -------------------------------------------------------------------

    def _boto_session(self) -> Any:
        if self._session is None:
            boto3 = require_extra("boto3", "aws")
            kwargs: dict[str, Any] = {"region_name": self.settings.get("region") or "us-east-1"}
            if self.settings.get("profile"):
                kwargs["profile_name"] = self.settings["profile"]
            if self.settings.get("access_key_id"):
                field = f"providers.{self.name}.secret_access_key_file"
                if not self.settings.get("secret_access_key_file"):
                    raise InvalidArgument(field, "required when access_key_id is set")
                kwargs["aws_access_key_id"] = self.settings["access_key_id"]
                kwargs["aws_secret_access_key"] = read_private_file(
                    self.settings["secret_access_key_file"], field)
            self._session = boto3.Session(**kwargs)
        return self._session

    def client(self, service: str, region: str | None = None) -> Any:
        """A cached boto3 client (thread-safe) for `service` in `region` (blocking: it loads
        the service model and may read the secret file)."""
        region = region or self.settings.get("region") or "us-east-1"
        key = (service, region)
        with self._clients_lock:
            if key not in self._clients:
                self._clients[key] = self._new_client(service, region)
            return self._clients[key]

    async def aclient(self, service: str, region: str | None) -> Any:
        return await self.call(f"aws provider {self.name!r}: setting up the {service} client",
                                self.client, service, region)

    def _new_client(self, service: str, region: str) -> Any:
        botocore_config = require_extra("botocore.config", "aws")
        parallel = int(self.settings.get("parallel_blocks", 16))
        options = botocore_config.Config(
            retries={"max_attempts": self.retry_policy.attempts, "mode": "standard"},
            max_pool_connections=max(10, parallel), connect_timeout=10, read_timeout=60)
        return self._boto_session().client(
            service, region_name=region, endpoint_url=self.settings.get("endpoint_url") or None,
            config=options)

    async def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A blocking SDK call in a thread (botocore retries on its own); errors mapped."""
        return await self.guard(what, asyncio.to_thread(fn, *args, **kwargs))

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """botocore's exceptions as the service's errors, the message saying what failed."""
        botocore_exceptions = require_extra("botocore.exceptions", "aws")
        if isinstance(exc, botocore_exceptions.NoCredentialsError):
            return Unavailable(f"{what}: no AWS credentials found; set access_key_id and "
                               "secret_access_key_file or profile in the provider config, "
                               "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment")
        if isinstance(exc, botocore_exceptions.ClientError):
            return _client_error(exc, what)
        if isinstance(exc, (botocore_exceptions.EndpointConnectionError,
                            botocore_exceptions.ConnectionError)):
            return Retryable(f"{what}: cannot reach AWS ({type(exc).__name__})")
        if isinstance(exc, botocore_exceptions.BotoCoreError):
            return Failed(f"{what}: {exc}")
        if isinstance(exc, OSError):
            return Failed(f"{what}: {exc.strerror or exc}")
        return None


    # --- discovery -------------------------------------------------------------------

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        filters = _ec2_filters(vm_filter)
        region = vm_filter.get("region") or None
        if region is not None and not isinstance(region, str):
            raise InvalidArgument("filter.region", "a region name such as eu-west-1")
        instances = await self._describe_instances(region, Filters=filters)
        return [await self._vm_info(instance, region) for instance in instances]

    async def get_vm(self, identifier: str) -> VMInfo:
        region, _, key = identifier.rpartition("/") if "/" in identifier else ("", "", identifier)
        region = region or None
        if key.startswith("i-"):
            found = await self._describe_instances(region, Filters=[
                {"Name": "instance-id", "Values": [key]}])
        else:
            found = await self._describe_instances(region, Filters=[
                {"Name": "tag:Name", "Values": [key]}])
        found = [i for i in found if i["State"]["Name"] != "terminated"]
        if len(found) > 1:
            ids = ", ".join(i["InstanceId"] for i in found)
            raise InvalidArgument("vm_identifier", f"the name {key!r} matches several instances "
                                                   f"({ids}); use an instance id")
        if not found:
            everything = await self._describe_instances(region)
            names = [_name_of(i) for i in everything] + [i["InstanceId"] for i in everything]
            raise NotFound(f"aws provider {self.name!r}: no instance {key!r}{closest(key, names)}")
        return await self._vm_info(found[0], region)

    async def _describe_instances(self, region: str | None, **kwargs: Any) -> list[dict]:
        ec2 = await self.aclient("ec2", region)

        def collect() -> list[dict]:
            pages = ec2.get_paginator("describe_instances").paginate(**kwargs)
            return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
        return await self.call(f"aws provider {self.name!r}: listing instances", collect)

    async def _instance_type(self, region: str | None, name: str) -> dict:
        key = (region or "", name)
        if key not in self._instance_types:
            ec2 = await self.aclient("ec2", region)
            found = await self.call(f"describing instance type {name}",
                                     ec2.describe_instance_types, InstanceTypes=[name])
            types = found.get("InstanceTypes") or [{}]
            self._instance_types[key] = types[0]
        return self._instance_types[key]

    async def _vm_info(self, instance: dict, region: str | None) -> VMInfo:
        region = region or self.settings.get("region") or "us-east-1"
        itype = await self._instance_type(region, instance.get("InstanceType", ""))
        volumes = await self._volumes(instance, region)
        state = instance["State"]["Name"]
        tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
        cpu_options = instance.get("CpuOptions") or {}
        cpus = (cpu_options.get("CoreCount", 0) * cpu_options.get("ThreadsPerCore", 1)
                or itype.get("VCpuInfo", {}).get("DefaultVCpus", 1))
        return VMInfo(
            identifier=instance["InstanceId"], name=tags.get("Name", instance["InstanceId"]),
            provider=self.name, power_state=POWER_STATES.get(state, "unknown"),
            path=f"{region}/{instance['InstanceId']}", uuid=instance["InstanceId"],
            guest_os=instance.get("PlatformDetails") or instance.get("Platform") or "",
            cpus=int(cpus), memory_mb=int(itype.get("MemoryInfo", {}).get("SizeInMiB", 0)),
            firmware=_firmware(instance),
            datacenter=instance.get("Placement", {}).get("AvailabilityZone", region),
            tags=[f"{k}={v}" for k, v in sorted(tags.items())],
            disks=_disks(instance, volumes), nics=_nics(instance),
            extra={"region": region, "instance_type": instance.get("InstanceType", ""),
                   "state": state, "architecture": instance.get("Architecture", "")})

    async def _volumes(self, instance: dict, region: str) -> dict[str, dict]:
        ids = [m["Ebs"]["VolumeId"] for m in instance.get("BlockDeviceMappings", []) if "Ebs" in m]
        if not ids:
            return {}
        ec2 = await self.aclient("ec2", region)
        found = await self.call(f"describing the volumes of {instance['InstanceId']}",
                                 ec2.describe_volumes, VolumeIds=ids)
        return {v["VolumeId"]: v for v in found["Volumes"]}

    # --- export ----------------------------------------------------------------------

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        vm = await self.get_vm(identifier)
        extra = _parse_extra(options.extra, vm, Path(self.config.export.base_path))
        region, timeout = vm.extra["region"], extra["shutdown_timeout"]
        restart = f"starting instance {vm.identifier} again"
        made: list[str] = []
        output = OutputFiles(target_dir)
        async with Cleanups(sink) as cleanups:
            if options.shutdown_vm and vm.power_state == "poweredOn":
                await self.set_power(vm, "stop", sink, timeout)
                if options.restore_power_state:
                    cleanups.add(restart, lambda: self.set_power(vm, "start", sink, timeout))
            if not extra["keep_snapshots"]:
                cleanups.add("deleting our snapshots",
                             lambda: self.delete_snapshots(region, made, sink))
            try:
                snapshots = dict(extra["snapshot_ids"])
                for disk in vm.disks:
                    if disk.key not in snapshots:
                        snapshots[disk.key] = await self.create_snapshot(vm, disk, made, sink)
                await self.wait_snapshots(region, made, sink)
                # the snapshots hold the disks now: the instance need not wait for the reading
                await cleanups.run_early(restart)
                exported = []
                for disk in vm.disks:
                    exported.append(await self._export_volume(
                        vm, disk, snapshots[disk.key], extra, target_dir, options, sink))
                    output.add(exported[-1].path)
            except BaseException:
                output.discard()
                raise
        vm.extra["snapshot_ids"] = snapshots
        vm.extra["snapshots_deleted"] = [] if extra["keep_snapshots"] else made
        return vm, exported

    async def warm_source(self, identifier: str, options: ExportOptions,
                          sink: ExportSink) -> "AwsWarmSource":
        """The instance for warm migration (aws_warm.py); at cutover it is stopped
        (waiting up to provider_options.shutdown_timeout)."""
        provider_options(options.extra, ("shutdown_timeout",))
        vm = await self.get_vm(identifier)
        return AwsWarmSource(self, vm, sink,
                             shutdown_timeout(options.extra, DEFAULT_SHUTDOWN_TIMEOUT),
                             parallel=int(self.settings.get("parallel_blocks", 16)),
                             max_retries=options.max_retries)

    async def _export_volume(self, vm: VMInfo, disk: DiskInfo, snapshot_id: str, extra: dict,
                             target_dir: Path, options: ExportOptions,
                             sink: ExportSink) -> ExportedDisk:
        base = extra["base_snapshot_ids"].get(disk.key)
        read = SnapshotRead(snapshot_id, target_dir / f"{disk.key}.raw", base_snapshot_id=base,
                            base_image=extra["base_images"].get(disk.key) if base else None)
        how = f"changes since {base}" if base else "all blocks"
        sink.log(f"reading snapshot {snapshot_id} of {disk.key} ({how})")
        ebs = await self.aclient("ebs", vm.extra["region"])
        size, digest, fetched = await self.guard(
            f"reading snapshot {snapshot_id} of volume {disk.key}",
            read_snapshot(ebs, read,
                          parallel=int(self.settings.get("parallel_blocks", 16)),
                          max_retries=options.max_retries, sink=sink))
        sink.log(f"{disk.key}: {fetched} blocks read into {read.target.name}")
        return ExportedDisk(path=read.target, format="raw", capacity_bytes=size, file_bytes=size,
                            sha256=digest, boot_order=disk.boot_order, label=disk.label,
                            key=disk.key)

    async def create_snapshot(self, vm: VMInfo, disk: DiskInfo, made: list[str],
                              sink: ExportSink, round_name: str = "") -> str:
        """Snapshot the volume (for a warm migration's round `round_name`, tagged so);
        its id joins `made` even if the job is cancelled while the request is out, so the
        cleanups delete it."""
        ec2 = await self.aclient("ec2", vm.extra["region"])
        tags = [{"Key": "hypersdk:instance", "Value": vm.identifier},
                {"Key": "hypersdk:volume", "Value": disk.key}]
        what = f"hypersdk export of {vm.identifier} {disk.label}"
        if round_name:
            tags.append({"Key": ROUND_TAG, "Value": round_name})
            what = f"hypersdk warm migration of {vm.identifier} {disk.label}: {round_name}"

        reply = await recorded_even_if_cancelled(
            self.call(f"snapshotting volume {disk.key}", ec2.create_snapshot,
                      VolumeId=disk.key, Description=what,
                      TagSpecifications=[{"ResourceType": "snapshot", "Tags": tags}]),
            lambda made_now: made.append(made_now["SnapshotId"]))
        sink.log(f"snapshot {reply['SnapshotId']} of {disk.key} started")
        return reply["SnapshotId"]

    async def wait_snapshots(self, region: str, snapshot_ids: list[str], sink: ExportSink) -> None:
        if not snapshot_ids:
            return
        ec2 = await self.aclient("ec2", region)
        pending = set(snapshot_ids)

        async def all_completed() -> bool | None:
            found = await self.call("waiting for snapshots", ec2.describe_snapshots,
                                     SnapshotIds=sorted(pending))
            for snap in found["Snapshots"]:
                if snap["State"] == "error":
                    raise Failed(f"snapshot {snap['SnapshotId']} failed: "
                                 f"{snap.get('StateMessage', 'no reason given')}")
                if snap["State"] == "completed":
                    pending.discard(snap["SnapshotId"])
                    sink.log(f"snapshot {snap['SnapshotId']} completed")
            return True if not pending else None

        timeout = float(self.settings.get("snapshot_timeout", 7200.0))
        await poll_until(all_completed, interval=float(self.settings.get("poll_interval", 5.0)),
                         timeout=timeout, what=f"snapshots {', '.join(sorted(pending))} "
                                               "completing (providers.<name>.snapshot_timeout)")

    async def delete_snapshots(self, region: str, snapshot_ids: list[str], sink: ExportSink) -> None:
        """Best effort: a snapshot that cannot be deleted is logged, never raised over the result."""
        ec2 = await self.aclient("ec2", region)
        for snapshot_id in snapshot_ids:
            try:
                await self.call(f"deleting snapshot {snapshot_id}", ec2.delete_snapshot,
                                 SnapshotId=snapshot_id)
                sink.log(f"snapshot {snapshot_id} deleted")
            except HyperSDKError as exc:
                sink.log(f"could not delete snapshot {snapshot_id}: {exc}", "warning")

    async def set_power(self, vm: VMInfo, action: str, sink: ExportSink, timeout: float) -> None:
        ec2 = await self.aclient("ec2", vm.extra["region"])
        call = ec2.stop_instances if action == "stop" else ec2.start_instances
        wanted = "stopped" if action == "stop" else "running"
        sink.log(f"{action} instance {vm.identifier}")
        await self.call(f"{action} instance {vm.identifier}", call, InstanceIds=[vm.identifier])

        async def reached() -> bool | None:
            found = await self._describe_instances(vm.extra["region"], InstanceIds=[vm.identifier])
            return True if found and found[0]["State"]["Name"] == wanted else None

        await poll_until(reached, interval=float(self.settings.get("poll_interval", 5.0)),
                         timeout=timeout, what=f"instance {vm.identifier} reaching {wanted!r}")

    async def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def _client_error(exc: Any, what: str) -> HyperSDKError:
    """An AWS API's error answer (a botocore ClientError) by its code."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    message = str(error.get("Message", "")).split("\n")[0][:300]
    if code in AUTH_ERROR_CODES:
        return Unavailable(f"{what}: AWS refused the credentials or the permission "
                           f"({code}: {message})")
    if code.endswith("NotFound") or code == "ResourceNotFoundException":
        return NotFound(f"{what}: {message or code}")
    if code in THROTTLE_CODES:
        return Retryable(f"{what}: AWS is throttling requests ({code})")
    return Failed(f"{what}: {code or 'error'}: {message}")


def _ec2_filters(vm_filter: dict) -> list[dict]:
    filters = []
    tags = vm_filter.get("tags") or {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise InvalidArgument("filter.tags", "a mapping of tag names to values")
    for key, value in tags.items():
        filters.append({"Name": f"tag:{key}", "Values": [value]})
    if vm_filter.get("state"):
        states = vm_filter["state"]
        states = [states] if isinstance(states, str) else states
        if not isinstance(states, list) or not set(states) <= set(EC2_STATES):
            raise InvalidArgument("filter.state", "an instance state or a list of them, from: "
                                                  + ", ".join(EC2_STATES))
        filters.append({"Name": "instance-state-name", "Values": states})
    if vm_filter.get("name"):
        filters.append({"Name": "tag:Name", "Values": [str(vm_filter["name"])]})
    return filters


def _name_of(instance: dict) -> str:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == "Name"),
                instance["InstanceId"])


def _firmware(instance: dict) -> str:
    mode = instance.get("CurrentInstanceBootMode") or instance.get("BootMode") or ""
    return "uefi" if mode.startswith("uefi") else "bios"


def _disks(instance: dict, volumes: dict[str, dict]) -> list[DiskInfo]:
    root = instance.get("RootDeviceName")
    disks = []
    for mapping in instance.get("BlockDeviceMappings", []):
        if "Ebs" not in mapping:
            continue
        volume_id = mapping["Ebs"]["VolumeId"]
        volume = volumes.get(volume_id, {})
        disks.append(DiskInfo(
            key=volume_id, label=mapping.get("DeviceName", volume_id),
            capacity_bytes=int(volume.get("Size", 0)) * GIB, location=volume_id,
            controller="nvme" if mapping.get("DeviceName", "").startswith("/dev/nvme") else "",
            boot_order=1 if mapping.get("DeviceName") == root else None))
    disks.sort(key=lambda d: (d.boot_order is None, d.label))
    return disks


def _nics(instance: dict) -> list[NicInfo]:
    adapter = "ena" if instance.get("EnaSupport") else ""
    return [NicInfo(key=nic["NetworkInterfaceId"], mac=nic.get("MacAddress", ""),
                    network=nic.get("SubnetId") or nic.get("VpcId", ""), adapter=adapter)
            for nic in sorted(instance.get("NetworkInterfaces", []),
                              key=lambda n: n.get("Attachment", {}).get("DeviceIndex", 0))]


def _parse_extra(extra: dict, vm: VMInfo, export_base: Path) -> dict:
    """Check `options.extra` against the instance's volumes; fill defaults.

    Base images must lie under export.base_path: the daemon reads them as root, and
    any other file would be copied into the export."""
    fields = provider_options(extra, EXTRA_KEYS)
    volume_ids = {d.key for d in vm.disks}
    result: dict[str, Any] = {"keep_snapshots": fields.flag("keep_snapshots", False),
                              "shutdown_timeout": shutdown_timeout(extra, DEFAULT_SHUTDOWN_TIMEOUT)}
    for key in ("snapshot_ids", "base_snapshot_ids", "base_images"):
        result[key] = dict(fields.text_map(key, {}))
        for volume_id in result[key]:
            if volume_id not in volume_ids:
                raise InvalidArgument(f"options.provider_options.{key}.{volume_id}",
                                      f"a volume of {vm.identifier} ({', '.join(sorted(volume_ids))})")
    for volume_id in result["base_snapshot_ids"]:
        image = result["base_images"].get(volume_id)
        field = f"options.provider_options.base_images.{volume_id}"
        if not image or not Path(image).is_file():
            raise InvalidArgument(field, "the raw image exported from the base snapshot "
                                         "(an existing file) is needed for an incremental export")
        if not Path(image).resolve().is_relative_to(export_base.resolve()):
            raise InvalidArgument(field, f"a file under export.base_path ({export_base})")
    result["base_images"] = {k: Path(v).resolve() for k, v in result["base_images"].items()}
    return result


PROVIDER_CLASS = AwsProvider

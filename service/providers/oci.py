"""Oracle Cloud Infrastructure: instances in a compartment, exported as a custom image.

Export: `CreateImage` from the instance (a custom image holds the boot volume; block
volumes are listed in the VM info but OCI has no export of them to Object Storage),
wait until it is AVAILABLE, `ExportImage` to `export_bucket` as QCOW2 or VMDK, wait
until the image is AVAILABLE again, create a read-only pre-authenticated request
(PAR) for the object and download it over plain HTTPS with `disks/download.py`
(streamed, resumed with Range, sha256). The PAR, the object and the image are
deleted afterwards, also when a step fails.

Credentials: an OCI config file (`config_file`/`profile`, the SDK's standard
`~/.oci/config`) or the API-key settings `tenancy`, `user`, `fingerprint` and
`key_file` (mode 0600 or stricter). The SDK signs every request; its own retries are
off: throttling (429) and 5xx answers are retried by the provider's `RetryPolicy`
(`calls.py`) honouring `Retry-After`, up to `export.max_retries` times. A PAR URL is a secret and never shown.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import secrets
from pathlib import Path
from typing import Any, Callable

from ..config_schema import Field
from ..errors import Failed, HyperSDKError, InvalidArgument, NotAuthorized, NotFound, Retryable, \
    Unavailable
from ..disks.download import download
from ..disks.ovf_writer import safe_name
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider, require_extra
from .cleanup import recorded_even_if_cancelled, run_to_completion
from .common import OutputFiles, check_filter, closest, poll_until, private_file_rule, \
    provider_options

SDK_MODULES = ("oci",)
GIB = 1024 ** 3
FILTER_KEYS = ("tags", "power_state", "name", "availability_domain")
POWER_STATES = {"RUNNING": "poweredOn", "STOPPED": "poweredOff", "STOPPING": "poweredOn",
                "STARTING": "poweredOff"}

CONFIG_SCHEMA = {
    "compartment_id": Field("str", doc="OCID of the compartment to list and export from"),
    "config_file": Field("str", "", doc="OCI config file; empty: use the settings below "
                                        "or ~/.oci/config"),
    "profile": Field("str", "DEFAULT"),
    "tenancy": Field("str", ""),
    "user": Field("str", ""),
    "fingerprint": Field("str", ""),
    "key_file": Field("str", "", check=private_file_rule),
    "region": Field("str", ""),
    "export_bucket": Field("str", ""),
    "namespace": Field("str", "", doc="Object Storage namespace (default: asked from the API)"),
    "export_format": Field("str", "QCOW2", choices=("QCOW2", "VMDK")),
    "compute_endpoint": Field("str", "", doc="e.g. http://127.0.0.1:8080 (default: the region's)"),
    "objectstorage_endpoint": Field("str", ""),
    "poll_interval": Field("duration", 15.0),
    "export_timeout": Field("duration", 7200.0),
    "par_lifetime": Field("duration", 86400.0),
}


class OciProvider(Provider):
    kind = "oci"

    def __init__(self, name: str, settings: dict, config: Any) -> None:
        super().__init__(name, settings, config)
        self._clients: dict[str, Any] | None = None
        self._object_namespace: str = settings["namespace"]

    # ----------------------------------------------------------------- clients

    def _sdk_config(self, oci: Any) -> dict:
        s = self.settings
        key_field = f"providers.{self.name}.key_file"
        if s["key_file"] or s["user"]:
            sdk_config = {"tenancy": s["tenancy"], "user": s["user"],
                          "fingerprint": s["fingerprint"], "key_file": s["key_file"],
                          "region": s["region"]}
        else:
            path = s["config_file"] or oci.config.DEFAULT_LOCATION
            try:
                sdk_config = oci.config.from_file(path, s["profile"])
            except (oci.exceptions.ConfigFileNotFound, oci.exceptions.ProfileNotFound,
                    oci.exceptions.InvalidConfig) as exc:
                raise Unavailable(f"provider {self.name!r}: no usable OCI config "
                                  f"({type(exc).__name__} for {path} [{s['profile']}])") from None
            if s["region"]:
                sdk_config["region"] = s["region"]
            key_field = f"{path} [{s['profile']}] key_file"
        rule = private_file_rule(sdk_config.get("key_file", ""))
        if rule:
            raise InvalidArgument(key_field, rule)
        try:
            oci.config.validate_config(sdk_config)
        except oci.exceptions.InvalidConfig as exc:
            fields = ", ".join(sorted(exc.args[0])) if exc.args and isinstance(exc.args[0], dict) \
                else "the API-key settings"
            raise InvalidArgument(f"providers.{self.name}", f"a valid OCI API key setup "
                                  f"(tenancy, user, fingerprint, key_file, region); "
                                  f"check {fields}") from None
        return sdk_config

    def _get_clients(self) -> dict[str, Any]:
        if self._clients is None:
            oci = require_extra("oci", "oci")
            sdk_config = self._sdk_config(oci)
            common = {"retry_strategy": oci.retry.NoneRetryStrategy(),
                      "circuit_breaker_strategy": oci.circuit_breaker.NoCircuitBreakerStrategy()}

            def endpoint(key: str) -> dict:
                return {"service_endpoint": self.settings[key]} if self.settings[key] else {}

            self._clients = {
                "oci": oci,
                "compute": oci.core.ComputeClient(sdk_config, **common, **endpoint("compute_endpoint")),
                "blockstorage": oci.core.BlockstorageClient(sdk_config, **common,
                                                            **endpoint("compute_endpoint")),
                "network": oci.core.VirtualNetworkClient(sdk_config, **common,
                                                         **endpoint("compute_endpoint")),
                "objects": oci.object_storage.ObjectStorageClient(
                    sdk_config, **common, **endpoint("objectstorage_endpoint")),
            }
        return self._clients

    async def _call(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """The data of `_call_raw`'s response."""
        return (await self._call_raw(what, fn, *args, **kwargs)).data

    async def _call_raw(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """A blocking SDK call in a thread; 429/5xx retried (Retry-After honoured), errors mapped."""
        self._get_clients()  # first: a missing extra is Unavailable, not an unmapped error
        return await self.call(what, fn, *args, **kwargs)

    async def _list_all(self, what: str, fn: Callable, *args: Any, **kwargs: Any) -> list:
        """Every page of a list call (the SDK's pagination helper retries on its own terms)."""
        items: list = []
        page = None
        while True:
            response = await self._call_raw(what, fn, *args, **kwargs,
                                            **({"page": page} if page else {}))
            items.extend(response.data)
            page = response.next_page
            if not page:
                return items

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """The SDK's ServiceError by HTTP status (429/5xx transient, honouring Retry-After);
        no answer at all is Unavailable."""
        import requests

        oci = self._get_clients()["oci"]
        if isinstance(exc, oci.exceptions.ServiceError):
            text = f"provider {self.name!r}: {what}: {exc.code} (HTTP {exc.status}) {exc.message}"
            if exc.status in (401, 403):
                return NotAuthorized(text)
            if exc.status == 404:
                return NotFound(text)
            if exc.status == 429 or exc.status >= 500:
                return Retryable(text, retry_after=_retry_after(exc.headers))
            return Failed(text)
        if isinstance(exc, (oci.exceptions.RequestException, requests.exceptions.RequestException)):
            return Unavailable(f"provider {self.name!r}: {what}: cannot reach the API "
                               f"({type(exc).__name__})")
        return None

    # --------------------------------------------------------------- discovery

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        tags = vm_filter.get("tags", {})
        if not isinstance(tags, dict):
            raise InvalidArgument("filter.tags", "a mapping of freeform tag keys to values")
        result = []
        for inst in await self._instances():
            if any(inst.freeform_tags.get(k) != v for k, v in tags.items()):
                continue
            if "name" in vm_filter and not fnmatch.fnmatchcase(inst.display_name,
                                                               str(vm_filter["name"])):
                continue
            if vm_filter.get("availability_domain") not in (None, inst.availability_domain):
                continue
            info = await self._vm_info(inst)
            if vm_filter.get("power_state") not in (None, info.power_state):
                continue
            result.append(info)
        return result

    async def _instances(self) -> list[Any]:
        compute = self._get_clients()["compute"]
        instances = await self._list_all("listing instances", compute.list_instances,
                                         compartment_id=self.settings["compartment_id"])
        return [i for i in instances if i.lifecycle_state not in ("TERMINATED", "TERMINATING")]

    async def get_vm(self, identifier: str) -> VMInfo:
        clients = self._get_clients()
        if identifier.startswith("ocid1.instance."):
            return await self._vm_info(await self._call(f"instance {identifier}",
                                                         clients["compute"].get_instance,
                                                         identifier))
        found = await self._instances()
        matches = [i for i in found if i.display_name == identifier]
        if len(matches) == 1:
            return await self._vm_info(matches[0])
        if matches:
            raise InvalidArgument("vm_identifier", f"{len(matches)} instances are named "
                                  f"{identifier!r}; use the instance OCID")
        raise NotFound(f"no instance {identifier!r} in the compartment"
                       f"{closest(identifier, [i.display_name for i in found])}")

    async def _vm_info(self, inst: Any) -> VMInfo:
        disks = await self._volumes(inst)
        nics = await self._nics(inst)
        shape = inst.shape_config
        cpus = (shape.vcpus or int((shape.ocpus or 0) * 2)) if shape else 1
        memory_mb = int((shape.memory_in_gbs or 0) * 1024) if shape else 0
        launch = inst.launch_options
        platform = inst.platform_config
        guest_os = await self._guest_os(inst.image_id)
        return VMInfo(identifier=inst.id, name=inst.display_name, provider=self.name,
                      power_state=POWER_STATES.get(inst.lifecycle_state, "unknown"),
                      uuid=inst.id, guest_os=guest_os, cpus=max(1, cpus), memory_mb=memory_mb,
                      firmware="uefi" if launch and launch.firmware == "UEFI_64" else "bios",
                      secure_boot=bool(platform and platform.is_secure_boot_enabled),
                      datacenter=inst.availability_domain,
                      tags=sorted(f"{k}={v}" for k, v in (inst.freeform_tags or {}).items()),
                      disks=disks, nics=nics,
                      extra={"shape": inst.shape, "lifecycle_state": inst.lifecycle_state})

    async def _guest_os(self, image_id: str | None) -> str:
        """'Oracle Linux 8' from the image the instance was launched from ('' once it is gone)."""
        if not image_id:
            return ""
        try:
            image = await self._call("source image", self._get_clients()["compute"].get_image,
                                     image_id)
        except NotFound:
            return ""
        return " ".join(filter(None, (image.operating_system, image.operating_system_version)))

    async def _nics(self, inst: Any) -> list[NicInfo]:
        clients = self._get_clients()
        attachments = await self._list_all("listing VNICs", clients["compute"].list_vnic_attachments,
                                           self.settings["compartment_id"], instance_id=inst.id)
        nics = []
        for attachment in sorted((a for a in attachments if a.lifecycle_state == "ATTACHED"),
                                 key=lambda a: a.nic_index or 0):
            vnic = await self._call("VNIC", clients["network"].get_vnic, attachment.vnic_id)
            nics.append(NicInfo(key=vnic.id, mac=(vnic.mac_address or "").lower(),
                                network=vnic.subnet_id or "", adapter="paravirtualized"))
        return nics

    async def _volumes(self, inst: Any) -> list[DiskInfo]:
        clients = self._get_clients()
        compartment = self.settings["compartment_id"]
        boots = await self._list_all("listing boot volumes",
                                     clients["compute"].list_boot_volume_attachments,
                                     inst.availability_domain, compartment, instance_id=inst.id)
        disks = []
        for attachment in boots:
            volume = await self._call("boot volume", clients["blockstorage"].get_boot_volume,
                                      attachment.boot_volume_id)
            disks.append(DiskInfo(key="boot", label=volume.display_name,
                                  capacity_bytes=volume.size_in_gbs * GIB, location=volume.id,
                                  controller="virtio", boot_order=1))
        attached = await self._list_all("listing block volumes",
                                        clients["compute"].list_volume_attachments, compartment,
                                        instance_id=inst.id)
        for index, attachment in enumerate(a for a in attached if a.lifecycle_state == "ATTACHED"):
            volume = await self._call("block volume", clients["blockstorage"].get_volume,
                                      attachment.volume_id)
            disks.append(DiskInfo(key=f"volume-{index}", label=volume.display_name,
                                  capacity_bytes=volume.size_in_gbs * GIB, location=volume.id,
                                  controller=attachment.attachment_type or ""))
        return disks

    # ------------------------------------------------------------------ export

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        provider_options(options.extra, ())  # the oci provider takes none
        bucket = self.settings["export_bucket"]
        if not bucket:
            raise InvalidArgument(f"providers.{self.name}.export_bucket",
                                  "an Object Storage bucket is needed to export from OCI")
        vm = await self.get_vm(identifier)
        boot = next((d for d in vm.disks if d.key == "boot"), None)
        if boot is None:
            raise Failed(f"instance {vm.name} has no boot volume to export")
        for volume in vm.disks:
            if volume is not boot:
                sink.log(f"block volume {volume.label} is not part of a custom image and is "
                         "not exported", "warning")
        if vm.power_state == "poweredOn":
            sink.log(f"{vm.name} runs: OCI stops it while the custom image is taken and "
                     "starts it again afterwards")
        fmt = self.settings["export_format"]
        outputs = OutputFiles(target_dir)
        cleanup: list[tuple[str, Any]] = []
        try:
            namespace = await self._namespace()
            image_id = await self._create_image(vm, sink, cleanup)
            object_name = f"hypersdk/{safe_name(vm.name, 60)}-{secrets.token_hex(4)}.{fmt.lower()}"
            await self._export_image(image_id, namespace, bucket, object_name, fmt, sink, cleanup)
            disk = await self._download(vm, boot, namespace, bucket, object_name, target_dir,
                                        options, sink, cleanup, outputs)
        except BaseException:
            outputs.discard()
            raise
        finally:
            await run_to_completion(self._clean_up(cleanup, sink))
        return vm, [disk]

    async def _made(self, what: str, cleanup: list[tuple[str, Any]],
                    entry: Callable[[Any], tuple[str, Any]], fn: Callable, *args: Any) -> Any:
        """A create call whose result enters `cleanup` (as `entry(result)`), even when the
        job is cancelled while the call is out."""
        return await recorded_even_if_cancelled(self._call(what, fn, *args),
                                                lambda made: cleanup.append(entry(made)))

    async def _namespace(self) -> str:
        if not self._object_namespace:
            self._object_namespace = await self._call(
                "Object Storage namespace", self._get_clients()["objects"].get_namespace)
        return self._object_namespace

    async def _create_image(self, vm: VMInfo, sink: ExportSink,
                            cleanup: list[tuple[str, Any]]) -> str:
        clients = self._get_clients()
        models = clients["oci"].core.models
        name = f"hypersdk-{safe_name(vm.name, 60)}-{secrets.token_hex(4)}"
        details = models.CreateImageDetails(compartment_id=self.settings["compartment_id"],
                                            instance_id=vm.identifier, display_name=name)
        image = await self._made("creating a custom image", cleanup, lambda made: ("image", made.id),
                                 clients["compute"].create_image, details)
        sink.log(f"creating custom image {image.display_name} of {vm.name}")
        await self._wait_image(image.id, "creating the custom image")
        return image.id

    async def _export_image(self, image_id: str, namespace: str, bucket: str, object_name: str,
                            fmt: str, sink: ExportSink, cleanup: list[tuple[str, Any]]) -> None:
        clients = self._get_clients()
        models = clients["oci"].core.models
        details = models.ExportImageViaObjectStorageTupleDetails(
            destination_type="objectStorageTuple", namespace_name=namespace, bucket_name=bucket,
            object_name=object_name, export_format=fmt)
        await self._made("exporting the image", cleanup,
                         lambda _: ("object", (namespace, bucket, object_name)),
                         clients["compute"].export_image, image_id, details)
        sink.log(f"exporting the image to {bucket}/{object_name} as {fmt}")
        await self._wait_image(image_id, "exporting the image")

    async def _wait_image(self, image_id: str, what: str) -> None:
        compute = self._get_clients()["compute"]

        async def available() -> bool | None:
            image = await self._call(what, compute.get_image, image_id)
            if image.lifecycle_state in ("DELETED", "DISABLED"):
                raise Failed(f"{what} failed: the image is {image.lifecycle_state}")
            return True if image.lifecycle_state == "AVAILABLE" else None

        await poll_until(available, interval=self.settings["poll_interval"],
                         timeout=self.settings["export_timeout"], what=what)

    async def _download(self, vm: VMInfo, boot: DiskInfo, namespace: str, bucket: str,
                        object_name: str, target_dir: Path, options: ExportOptions,
                        sink: ExportSink, cleanup: list[tuple[str, Any]],
                        outputs: OutputFiles) -> ExportedDisk:
        clients = self._get_clients()
        head = await self._call_raw(f"object {object_name}", clients["objects"].head_object,
                                    namespace, bucket, object_name)
        size = int(head.headers["content-length"])
        expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.settings["par_lifetime"])
        details = clients["oci"].object_storage.models.CreatePreauthenticatedRequestDetails(
            name=f"hypersdk-{secrets.token_hex(4)}", object_name=object_name,
            access_type="ObjectRead", time_expires=expires)
        par = await self._made("creating a pre-authenticated request", cleanup,
                               lambda made: ("par", (namespace, bucket, made.id)),
                               clients["objects"].create_preauthenticated_request,
                               namespace, bucket, details)
        url = clients["objects"].base_client.endpoint.rstrip("/") + par.access_uri
        fmt = self.settings["export_format"].lower()
        target = target_dir / f"{safe_name(vm.name, 60)}-boot.{fmt}"
        shown = f"{bucket}/{object_name} (via a pre-authenticated request)"
        sink.add_total(size)
        result = await download(url, target, expected_size=size,
                                chunk_size=options.chunk_size, max_retries=options.max_retries,
                                on_bytes=sink.advance, log=sink.log, shown=shown)
        outputs.add(target)
        sink.log(f"{target.name}: {result.size} bytes, sha256 {result.sha256}")
        return ExportedDisk(path=target, format=fmt, capacity_bytes=boot.capacity_bytes,
                            file_bytes=result.size, sha256=result.sha256, boot_order=1,
                            label=boot.label, key=boot.key)

    async def _clean_up(self, cleanup: list[tuple[str, Any]], sink: ExportSink) -> None:
        """Delete the PAR, the object and the image we made; log (not raise) failures."""
        clients = self._get_clients()
        order = {"par": 0, "object": 1, "image": 2}
        for kind, ref in sorted(cleanup, key=lambda item: order[item[0]]):
            try:
                if kind == "par":
                    await self._call("deleting the pre-authenticated request",
                                     clients["objects"].delete_preauthenticated_request, *ref)
                elif kind == "object":
                    await self._call("deleting the exported object",
                                     clients["objects"].delete_object, *ref)
                else:
                    await self._call("deleting the custom image", clients["compute"].delete_image,
                                     ref)
                sink.log(f"removed the {kind} made for the export")
            except HyperSDKError as exc:
                sink.log(f"could not remove the {kind} made for the export: {exc}", "warning")
        cleanup.clear()


def _retry_after(headers: Any) -> float | None:
    """The server's Retry-After in seconds, when it sent a number."""
    value = (headers or {}).get("retry-after") or (headers or {}).get("Retry-After")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


PROVIDER_CLASS = OciProvider

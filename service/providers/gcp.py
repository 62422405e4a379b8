"""Google Compute Engine: instances in a project, exported disk by disk through GCS.

Compute Engine has no API call that writes a disk into Cloud Storage. What `gcloud
compute images export` does, and what this provider does too, is:
1. `images.insert` with the disk as `sourceDisk` (force-created when the VM runs,
   which gives a crash-consistent image; `shutdown_vm` stops it first),
2. a Cloud Build run of Google's exporter image (`gce_vm_image_export`) that writes
   the image as one file in `export_format` to `gs://<export_bucket>/hypersdk/...`,
3. a ranged, resumable download of that object with the storage client (sha256
   computed, the object's md5 checked),
4. deleting the image and the object again, also when a step fails.

Credentials: `credentials_file` (a service-account JSON key, mode 0600 or stricter),
else Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud, the
metadata server). `anonymous` is for local emulators. The endpoint settings point
the clients elsewhere (tests, private service connect).
"""
from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import re
import secrets
from pathlib import Path
from typing import Any

from ..config_schema import Field
from ..errors import Failed, HyperSDKError, InvalidArgument, NotAuthorized, NotFound, Retryable, \
    Unavailable
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider, require_extra
from .cleanup import Cleanups, run_to_completion, undone_if_cancelled
from .common import OutputFiles, check_filter, closest, fetch_ranges, gather_bounded, \
    poll_until, private_file_rule, provider_options, read_private_file

SDK_MODULES = ("google.cloud.compute_v1", "google.cloud.storage")
GIB = 1024 ** 3
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
FILTER_KEYS = ("zone", "labels", "power_state", "name")
POWER_STATES = {"RUNNING": "poweredOn", "TERMINATED": "poweredOff", "STOPPED": "poweredOff",
                "SUSPENDED": "suspended"}
BUILD_DONE_OK = "SUCCESS"
BUILD_DONE_FAILED = ("FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED")

CONFIG_SCHEMA = {
    "project": Field("str", doc="the project id"),
    "zone": Field("str", "", doc="only this zone (default: all zones)"),
    "credentials_file": Field("str", "", check=private_file_rule,
                              doc="service-account JSON key; empty: Application Default Credentials"),
    "anonymous": Field("bool", False, doc="send no credentials (local emulators only)"),
    "export_bucket": Field("str", "", doc="GCS bucket the exporter writes images into"),
    "export_format": Field("str", "qcow2", choices=("qcow2", "vmdk", "vhdx", "vpc")),
    "exporter_image": Field("str", "gcr.io/compute-image-tools/gce_vm_image_export:release"),
    "compute_endpoint": Field("str", "", doc="e.g. http://127.0.0.1:8080 (default: Google's)"),
    "storage_endpoint": Field("str", ""),
    "cloudbuild_endpoint": Field("str", "https://cloudbuild.googleapis.com"),
    "poll_interval": Field("duration", 10.0),
    "export_timeout": Field("duration", 7200.0),
    "request_timeout": Field("duration", 60.0),
}


class GcpProvider(Provider):
    kind = "gcp"

    def __init__(self, name: str, settings: dict, config: Any) -> None:
        super().__init__(name, settings, config)
        self._clients: dict[str, Any] | None = None
        self._machine_types: dict[str, tuple[int, int]] = {}

    # ----------------------------------------------------------------- clients

    def _credentials(self) -> Any:
        import google.auth
        from google.auth.credentials import AnonymousCredentials
        from google.oauth2 import service_account

        if self.settings["anonymous"]:
            return AnonymousCredentials()
        key_file = self.settings["credentials_file"]
        if key_file:
            read_private_file(key_file, f"providers.{self.name}.credentials_file")
            return service_account.Credentials.from_service_account_file(key_file, scopes=SCOPES)
        try:
            credentials, _ = google.auth.default(scopes=SCOPES)
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise Unavailable(f"provider {self.name!r}: no Google credentials found "
                              f"(set providers.{self.name}.credentials_file or "
                              f"GOOGLE_APPLICATION_CREDENTIALS): {exc}") from None
        return credentials

    def _get_clients(self) -> dict[str, Any]:
        if self._clients is None:
            compute = require_extra("google.cloud.compute_v1", "gcp")
            storage = require_extra("google.cloud.storage", "gcp")
            from google.auth.transport.requests import AuthorizedSession

            credentials = self._credentials()
            options = ({"api_endpoint": self.settings["compute_endpoint"]}
                       if self.settings["compute_endpoint"] else None)
            storage_options = ({"api_endpoint": self.settings["storage_endpoint"]}
                               if self.settings["storage_endpoint"] else None)
            self._clients = {
                "compute": compute,
                "instances": compute.InstancesClient(credentials=credentials, client_options=options),
                "machine_types": compute.MachineTypesClient(credentials=credentials,
                                                            client_options=options),
                "images": compute.ImagesClient(credentials=credentials, client_options=options),
                "storage": storage.Client(project=self.settings["project"], credentials=credentials,
                                          client_options=storage_options),
                "session": AuthorizedSession(credentials),
            }
        return self._clients

    async def _clients_ready(self) -> dict[str, Any]:
        """The clients, created in a thread: finding default credentials may probe the network."""
        if self._clients is None:
            await asyncio.to_thread(self._get_clients)
        return self._get_clients()

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """google-api-core's and google-auth's exceptions, and the HTTP answers of the REST
        calls (`_rest`), as the service's errors; 429 and 5xx are transient."""
        import google.auth.exceptions
        from google.api_core import exceptions as gexc
        import requests
        import urllib3

        prefix = f"provider {self.name!r}: {what}"
        if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
            return _http_error(exc.response.status_code, prefix, _error_message(exc.response))
        if isinstance(exc, (gexc.Unauthenticated, gexc.PermissionDenied, gexc.Forbidden,
                            gexc.Unauthorized)):
            return NotAuthorized(f"{prefix} was refused: {exc.message}")
        if isinstance(exc, gexc.NotFound):
            return NotFound(f"{prefix}: {exc.message}")
        if isinstance(exc, (gexc.TooManyRequests, gexc.ServerError)):
            return Retryable(f"{prefix} failed for now: {exc.message}")
        if isinstance(exc, gexc.GoogleAPICallError):
            return Failed(f"{prefix} failed: {exc.message}")
        if isinstance(exc, google.auth.exceptions.GoogleAuthError):
            return NotAuthorized(f"{prefix}: the credentials were refused or cannot be used "
                                 f"({type(exc).__name__})")
        if isinstance(exc, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                            ConnectionError)):
            return Unavailable(f"{prefix}: cannot reach the API ({type(exc).__name__})")
        return None

    # --------------------------------------------------------------- discovery

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        labels = vm_filter.get("labels", {})
        if not isinstance(labels, dict):
            raise InvalidArgument("filter.labels", "a mapping of label keys to values")
        zone = vm_filter.get("zone") or self.settings["zone"]
        found = await self._instances(zone)
        result = []
        for inst_zone, inst in found:
            if any(inst.labels.get(k) != v for k, v in labels.items()):
                continue
            if "name" in vm_filter and not fnmatch.fnmatchcase(inst.name, str(vm_filter["name"])):
                continue
            info = await self._vm_info(inst_zone, inst)
            if vm_filter.get("power_state") not in (None, info.power_state):
                continue
            result.append(info)
        return result

    async def _instances(self, zone: str) -> list[tuple[str, Any]]:
        clients = await self._clients_ready()
        project = self.settings["project"]
        instances = clients["instances"]
        # the pagers fetch further pages while iterated: iterate inside the mapped call
        if zone:
            found = await self.call("listing instances",
                                     lambda: list(instances.list(project=project, zone=zone)))
            return [(zone, inst) for inst in found]
        scoped = await self.call("listing instances",
                                  lambda: list(instances.aggregated_list(project=project)))
        return [(key.rpartition("/")[2], inst) for key, items in scoped for inst in items.instances]

    async def get_vm(self, identifier: str) -> VMInfo:
        zone, _, name = identifier.rpartition("/")
        if zone:
            clients = await self._clients_ready()
            inst = await self.call(f"instance {identifier}", clients["instances"].get,
                                    project=self.settings["project"], zone=zone, instance=name)
            return await self._vm_info(zone, inst)
        found = await self._instances(self.settings["zone"])
        for inst_zone, inst in found:
            if identifier in (inst.name, str(inst.id)):
                return await self._vm_info(inst_zone, inst)
        names = [inst.name for _, inst in found]
        raise NotFound(f"no instance {identifier!r} in project {self.settings['project']}"
                       f"{closest(identifier, names)}")

    async def _machine_type(self, zone: str, url: str) -> tuple[int, int]:
        type_name = url.rpartition("/")[2]
        key = f"{zone}/{type_name}"
        if key not in self._machine_types:
            clients = await self._clients_ready()
            mtype = await self.call(f"machine type {type_name}", clients["machine_types"].get,
                                     project=self.settings["project"], zone=zone,
                                     machine_type=type_name)
            self._machine_types[key] = (mtype.guest_cpus, mtype.memory_mb)
        return self._machine_types[key]

    async def _vm_info(self, zone: str, inst: Any) -> VMInfo:
        cpus, memory_mb = await self._machine_type(zone, inst.machine_type)
        uefi = any(feature.type_ == "UEFI_COMPATIBLE"
                   for disk in inst.disks for feature in disk.guest_os_features)
        secure_boot = bool(inst.shielded_instance_config.enable_secure_boot)
        disks = [DiskInfo(key=f"disk-{disk.index}", label=disk.device_name,
                          capacity_bytes=disk.disk_size_gb * GIB,
                          location=_resource_path(disk.source),
                          controller=(disk.interface or "scsi").lower(),
                          boot_order=1 if disk.boot else None)
                 for disk in inst.disks if disk.type_ != "SCRATCH"]
        nics = [NicInfo(key=nic.name, mac="", network=nic.network.rpartition("/")[2])
                for nic in inst.network_interfaces]
        return VMInfo(identifier=f"{zone}/{inst.name}", name=inst.name, provider=self.name,
                      power_state=POWER_STATES.get(inst.status, "unknown"),
                      path=_resource_path(inst.self_link), uuid=str(inst.id),
                      guest_os=_guest_os(inst),
                      cpus=cpus, memory_mb=memory_mb,
                      firmware="uefi" if uefi or secure_boot else "bios",
                      secure_boot=secure_boot, datacenter=zone,
                      tags=sorted(f"{k}={v}" for k, v in inst.labels.items()),
                      disks=disks, nics=nics, extra={"status": inst.status})

    # ------------------------------------------------------------------ export

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        provider_options(options.extra, ())  # the gcp provider takes none
        bucket_name = self.settings["export_bucket"]
        if not bucket_name:
            raise InvalidArgument(f"providers.{self.name}.export_bucket",
                                  "a GCS bucket is needed to export from GCP")
        vm = await self.get_vm(identifier)
        zone = vm.datacenter
        outputs = OutputFiles(target_dir)
        created: list[tuple[str, str]] = []   # ("image", name) | ("object", name)
        stopped = False
        async with Cleanups(sink) as cleanups:
            try:
                if options.shutdown_vm and vm.power_state == "poweredOn":
                    await self._set_power(zone, vm.name, "stop", sink)
                    stopped = True
                    if options.restore_power_state:
                        cleanups.add(f"starting {vm.name} again",
                                     lambda: self._set_power(zone, vm.name, "start", sink))
                cleanups.add("removing our images and objects",
                             lambda: self._remove_created(created, sink))
                running = vm.power_state == "poweredOn" and not stopped
                if running:
                    sink.log(f"{vm.name} is running: images are crash-consistent "
                             "(use shutdown_vm for a clean copy)", "warning")
                disks = await gather_bounded(
                    vm.disks, lambda disk: self._export_disk(vm, disk, target_dir, options, sink,
                                                             running, created, outputs),
                    options.parallel_disks)
            except BaseException:
                outputs.discard()
                raise
        return vm, disks

    async def _export_disk(self, vm: VMInfo, disk: DiskInfo, target_dir: Path,
                           options: ExportOptions, sink: ExportSink, running: bool,
                           created: list[tuple[str, str]], outputs: OutputFiles) -> ExportedDisk:
        clients = await self._clients_ready()
        fmt = self.settings["export_format"]
        image = f"{_resource_name('hypersdk-' + vm.name)[:40]}-{disk.key}-{secrets.token_hex(4)}"
        project = self.settings["project"]
        sink.log(f"{disk.label}: creating image {image}")
        compute = clients["compute"]
        request = compute.InsertImageRequest(
            project=project, force_create=running,
            image_resource=compute.Image(name=image,
                                         source_disk=f"projects/{project}/{disk.location}"))
        operation = await self.call(f"creating image {image}", clients["images"].insert,
                                     request=request)
        created.append(("image", image))
        await self.call(f"creating image {image}", operation.result,
                         timeout=self.settings["export_timeout"])
        object_name = f"hypersdk/{image}.{fmt}"
        await self._run_exporter(image, f"gs://{self.settings['export_bucket']}/{object_name}",
                                 fmt, sink, created, object_name)
        bucket = clients["storage"].bucket(self.settings["export_bucket"])
        blob = await self.call(f"object {object_name}", bucket.get_blob, object_name)
        if blob is None:
            raise Failed(f"the exporter reported success but gs://{bucket.name}/{object_name} "
                         "does not exist")
        target = target_dir / f"{vm.name}-{disk.key}.{fmt}"
        sha256 = await self._download(blob, target, options, sink, outputs)
        return ExportedDisk(path=target, format=fmt, capacity_bytes=disk.capacity_bytes,
                            file_bytes=blob.size, sha256=sha256, boot_order=disk.boot_order,
                            label=disk.label, key=disk.key)

    async def _download(self, blob: Any, target: Path, options: ExportOptions, sink: ExportSink,
                        outputs: OutputFiles) -> str:
        md5 = hashlib.md5(usedforsecurity=False)
        sink.add_total(blob.size)
        sink.log(f"downloading gs://{blob.bucket.name}/{blob.name} ({blob.size} bytes)")

        # ranges through the configured endpoint (not the object's mediaLink), all from the
        # generation whose size and md5 we have: a replaced object fails instead of mixing
        reader = blob.bucket.blob(blob.name, generation=blob.generation)

        def read_range(offset: int, length: int) -> bytes:
            return reader.download_as_bytes(start=offset, end=offset + length - 1, checksum=None,
                                            raw_download=True, retry=None)

        sha256 = await fetch_ranges(read_range, target, blob.size, chunk_size=options.chunk_size,
                                    max_retries=options.max_retries, sink=sink, label=blob.name,
                                    map_error=self.mapped(f"reading {blob.name}"),
                                    also_hash=md5.update)
        outputs.add(target)
        if blob.md5_hash and base64.b64decode(blob.md5_hash) != md5.digest():
            raise Failed(f"{target.name}: md5 of the download does not match the object's")
        sink.log(f"{target.name}: checksum ok (sha256 {sha256})")
        return sha256

    async def _run_exporter(self, image: str, destination: str, fmt: str, sink: ExportSink,
                            created: list[tuple[str, str]], object_name: str) -> None:
        """Run the image exporter as a Cloud Build and wait for its end."""
        project = self.settings["project"]
        base = f"{self.settings['cloudbuild_endpoint'].rstrip('/')}/v1/projects/{project}/builds"
        timeout = self.settings["export_timeout"]
        body = {
            "steps": [{"name": self.settings["exporter_image"],
                       "args": [f"-source_image=projects/{project}/global/images/{image}",
                                f"-destination_uri={destination}", f"-format={fmt}",
                                f"-timeout={int(timeout)}s", "-client_id=hypersdk"]}],
            "timeout": f"{int(timeout)}s",
            "tags": ["gce-daisy", "gce-daisy-image-export", "hypersdk"],
        }
        build_id = await self._start_build(base, image, body)
        created.append(("object", object_name))
        sink.log(f"exporting image {image} to {destination} (Cloud Build {build_id})")


        async def done() -> bool | None:
            build = await self._rest("GET", f"{base}/{build_id}", f"export build {build_id}")
            status = build.get("status", "")
            if status in BUILD_DONE_FAILED:
                detail = build.get("statusDetail") or build.get("failureInfo", {}).get("detail", "")
                raise Failed(f"exporting image {image} failed: Cloud Build {build_id} "
                             f"ended {status} {detail}".rstrip())
            return True if status == BUILD_DONE_OK else None

        try:
            await poll_until(done, interval=self.settings["poll_interval"], timeout=timeout,
                             what=f"exporting image {image}")
        except BaseException:
            await run_to_completion(self._cancel_build(base, build_id))
            raise

    async def _start_build(self, base: str, image: str, body: dict) -> str:
        """Start the build; its id. A cancel while the request is out still cancels the
        build it started."""
        reply = await undone_if_cancelled(
            self._rest("POST", base, f"starting the export of {image}", json=body),
            lambda started: self._cancel_build(base, _build_id(started)))
        build_id = _build_id(reply)
        if not build_id:
            raise Failed(f"Cloud Build did not return a build id for the export of {image}")
        return build_id

    async def _cancel_build(self, base: str, build_id: str) -> None:
        """Ask Cloud Build to stop the export (best effort: it times out on its own)."""
        if not build_id:
            return
        try:
            await self._rest("POST", f"{base}/{build_id}:cancel", f"cancelling build {build_id}")
        except HyperSDKError:
            pass

    async def _rest(self, method: str, url: str, what: str, *, json: dict | None = None) -> dict:
        """A JSON call to a Google REST API outside the compute/storage clients."""
        session = (await self._clients_ready())["session"]

        def request() -> dict:
            response = session.request(method, url, json=json,
                                       timeout=self.settings["request_timeout"])
            response.raise_for_status()
            return response.json() if response.content else {}

        return await self.call(what, request)

    async def _set_power(self, zone: str, name: str, action: str, sink: ExportSink) -> None:
        clients = await self._clients_ready()
        sink.log(f"{action} instance {name}")
        operation = await self.call(f"{action} instance {name}", getattr(clients["instances"], action),
                                     project=self.settings["project"], zone=zone, instance=name)
        await self.call(f"{action} instance {name}", operation.result,
                         timeout=self.settings["export_timeout"])

    async def _remove_created(self, created: list[tuple[str, str]], sink: ExportSink) -> None:
        """Delete the images and objects this export made; log (not raise) what fails."""
        clients = await self._clients_ready()
        project = self.settings["project"]
        for kind, name in reversed(created):
            try:
                if kind == "image":
                    operation = await self.call(f"deleting image {name}", clients["images"].delete,
                                                 project=project, image=name)
                    await self.call(f"deleting image {name}", operation.result,
                                     timeout=self.settings["request_timeout"])
                else:
                    bucket = clients["storage"].bucket(self.settings["export_bucket"])
                    blob = await self.call(f"object {name}", bucket.get_blob, name)
                    if blob is not None:
                        await self.call(f"deleting object {name}", blob.delete)
                sink.log(f"removed {kind} {name}")
            except HyperSDKError as exc:
                sink.log(f"could not remove {kind} {name}: {exc}", "warning")
        created.clear()

    async def close(self) -> None:
        if self._clients is not None:
            await asyncio.to_thread(self._clients["session"].close)
            self._clients = None


def _guest_os(inst: Any) -> str:
    """The boot disk's OS license name, e.g. 'debian-12-bookworm' or 'windows-server-2022-dc'."""
    for disk in inst.disks:
        if disk.boot and disk.licenses:
            return disk.licenses[0].rpartition("/")[2]
    return ""


def _resource_path(url: str) -> str:
    """'https://.../compute/v1/projects/p/zones/z/disks/d' -> 'zones/z/disks/d'."""
    match = re.search(r"/projects/[^/]+/(.+)$", url)
    return match.group(1) if match else url


def _resource_name(text: str) -> str:
    """A valid GCE resource name: lower-case letters, digits, '-', at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name[:1].isalpha():
        name = "h-" + name
    return name[:63].rstrip("-")


def _http_error(status: int, prefix: str, message: str) -> HyperSDKError:
    """A Google REST API's error answer by its HTTP status."""
    if status in (401, 403):
        return NotAuthorized(f"{prefix} was refused: {message}")
    if status in (429, 500, 502, 503, 504):
        return Retryable(f"{prefix} failed for now: {message}")
    return Failed(f"{prefix} failed: HTTP {status} {message}")


def _error_message(response: Any) -> str:
    try:
        return str(response.json().get("error", {}).get("message", ""))[:300]
    except ValueError:
        return response.reason or ""


PROVIDER_CLASS = GcpProvider


def _build_id(reply: dict) -> str:
    """The id in Cloud Build's answer to a new build ("" when it gave none)."""
    return reply.get("metadata", {}).get("build", {}).get("id", "")

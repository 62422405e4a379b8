"""Hyper-V: VMs on one Windows host, driven with PowerShell over WinRM (pywinrm).

Everything the provider asks the host is a short PowerShell script whose output is
JSON (`ConvertTo-Json`); `_run_ps` is the one transport function. Parameters go in
as a JSON here-string, never spliced into the script text.

Export: `Export-VM` into a fresh folder under `host_export_dir` on the host (works
on running VMs; `shutdown_vm` stops the guest first), then each exported .vhdx/.vhd
is fetched over the same WinRM connection as base64 chunks of `read_chunk` bytes
(`[IO.File]` reads at an offset, so a failed chunk is simply read again), written
locally with sha256, and compared with the host's `Get-FileHash`. The export folder
is removed afterwards, also on failure. No extra share or port is needed; the cost
is speed: base64 inside SOAP, about 10 MB/s measured against the test endpoint, so
a 100 GB disk takes hours. Memory stays near 4 x `read_chunk` (base64 text, pywinrm's
pieces, the decoded bytes).

Connection: HTTPS on 5986 with NTLM or Kerberos by default; `transport: basic` with
`scheme: http` exists for lab hosts and tests. The password comes from `password`
(`${VAR}` in the config) or `password_file` (mode 0600 or stricter).
"""
from __future__ import annotations

import base64
import fnmatch
import json
import secrets
from pathlib import Path, PureWindowsPath
from typing import Any

from ..config_schema import Field
from ..errors import Failed, HyperSDKError, InvalidArgument, NotAuthorized, NotFound, Retryable, \
    Unavailable
from ..disks.ovf_writer import safe_name
from ..model import DiskInfo, ExportOptions, ExportSink, ExportedDisk, NicInfo, VMInfo
from .base import Provider, require_extra
from .calls import RetryPolicy
from .cleanup import Cleanups
from .common import OutputFiles, check_filter, closest, fetch_ranges, gather_bounded, \
    private_file_rule, provider_options, read_private_file

SDK_MODULES = ("winrm",)
FILTER_KEYS = ("name", "power_state", "generation")
POWER_STATES = {"Running": "poweredOn", "Off": "poweredOff", "Saved": "suspended",
                "Paused": "suspended"}
DISK_SUFFIXES = (".vhdx", ".vhd")
BUSY_STATUSES = (429, 503)

CONFIG_SCHEMA = {
    "host": Field("str", doc="the Hyper-V host name or address"),
    "port": Field("int", 0, minimum=0, doc="0: 5986 for https, 5985 for http"),
    "scheme": Field("str", "https", choices=("https", "http")),
    "transport": Field("str", "ntlm", choices=("ntlm", "kerberos", "basic", "credssp")),
    "username": Field("str", ""),
    "password": Field("str", "", secret=True),
    "password_file": Field("str", "", check=private_file_rule),
    "server_cert_validation": Field("bool", True),
    "ca_file": Field("str", "", doc="CA bundle for the host's certificate"),
    "host_export_dir": Field("str", "C:\\ProgramData\\hypersdk\\exports"),
    "read_chunk": Field("size", 8 * 1024 * 1024, minimum=4096),
    "operation_timeout": Field("duration", 60.0),
    "busy_retry_delay": Field("duration", 2.0, doc="first wait when the host answers 429/503"),
}

LIST_VMS = r"""
$vms = @(Get-VM | ForEach-Object {
  $vm = $_
  $secure = $false
  if ($vm.Generation -eq 2) { $secure = ((Get-VMFirmware -VM $vm).SecureBoot -eq 'On') }
  [pscustomobject]@{
    Id = $vm.Id.Guid; Name = $vm.Name; State = "$($vm.State)"; Generation = $vm.Generation
    ProcessorCount = $vm.ProcessorCount; MemoryStartup = $vm.MemoryStartup
    SecureBoot = $secure; Notes = $vm.Notes
    Disks = @(Get-VMHardDiskDrive -VM $vm | ForEach-Object {
      $vhd = Get-VHD -Path $_.Path
      [pscustomobject]@{ Path = $_.Path; ControllerType = "$($_.ControllerType)"
        ControllerNumber = $_.ControllerNumber; ControllerLocation = $_.ControllerLocation
        Size = $vhd.Size; FileSize = $vhd.FileSize } })
    Nics = @(Get-VMNetworkAdapter -VM $vm | ForEach-Object {
      [pscustomobject]@{ Name = $_.Name; MacAddress = $_.MacAddress; SwitchName = $_.SwitchName } })
  } })
ConvertTo-Json -InputObject $vms -Depth 5 -Compress
"""

SET_POWER = r"""
if ($p.action -eq 'stop') { Stop-VM -Id $p.id -Force } else { Start-VM -Id $p.id }
ConvertTo-Json -InputObject @{ ok = $true } -Compress
"""

EXPORT_VM = r"""
New-Item -ItemType Directory -Path $p.dir -Force | Out-Null
Export-VM -Id $p.id -Path $p.dir
$files = @(Get-ChildItem -LiteralPath $p.dir -Recurse -File |
  Where-Object { $_.Extension -in '.vhdx', '.vhd' } |
  ForEach-Object { [pscustomobject]@{ Path = $_.FullName; Length = $_.Length } })
ConvertTo-Json -InputObject $files -Compress
"""

READ_CHUNK = r"""
$fs = [IO.File]::Open($p.path, 'Open', 'Read', 'ReadWrite')
try {
  $null = $fs.Seek([long]$p.offset, 'Begin')
  $buf = New-Object byte[] ([int]$p.length)
  $n = 0
  while ($n -lt $buf.Length) { $r = $fs.Read($buf, $n, $buf.Length - $n); if ($r -le 0) { break }; $n += $r }
  ConvertTo-Json -InputObject @{ data = [Convert]::ToBase64String($buf, 0, $n) } -Compress
} finally { $fs.Dispose() }
"""

FILE_HASH = r"""
ConvertTo-Json -InputObject @{ sha256 = (Get-FileHash -LiteralPath $p.path -Algorithm SHA256).Hash } -Compress
"""

REMOVE_DIR = r"""
if (Test-Path -LiteralPath $p.dir) { Remove-Item -LiteralPath $p.dir -Recurse -Force }
ConvertTo-Json -InputObject @{ ok = $true } -Compress
"""


class HypervProvider(Provider):
    kind = "hyperv"

    # --------------------------------------------------------------- transport

    def _new_session(self) -> Any:
        """A pywinrm Session for one script: pywinrm closes its HTTP session after every
        command, so one Session must not be shared by the threads of parallel disks."""
        winrm = require_extra("winrm", "hyperv")
        s = self.settings
        password = s["password"]
        if s["password_file"]:
            password = read_private_file(s["password_file"], f"providers.{self.name}.password_file")
        if not s["username"] or not password:
            raise InvalidArgument(f"providers.{self.name}.username",
                                  "a user name and a password (password or password_file)")
        port = s["port"] or (5986 if s["scheme"] == "https" else 5985)
        options: dict[str, Any] = {
            "transport": s["transport"],
            "server_cert_validation": "validate" if s["server_cert_validation"] else "ignore",
            "operation_timeout_sec": int(s["operation_timeout"]),
            "read_timeout_sec": int(s["operation_timeout"]) + 10,
        }
        if s["ca_file"]:
            options["ca_trust_path"] = s["ca_file"]
        return winrm.Session(f"{s['scheme']}://{s['host']}:{port}/wsman",
                             auth=(s["username"], password), **options)

    def _run_ps(self, op: str, script: str, params: dict) -> Any:
        """Run one PowerShell script on the host (blocking) and return its JSON output.

        This is the provider's single transport boundary: the parameters travel as a
        JSON here-string so that no value is ever parsed as PowerShell code. Its
        exceptions are mapped by `map_error` (`_ps`, `fetch_ranges`).
        """
        session = self._new_session()   # first: a missing extra is Unavailable, not ImportError
        text = (f"# hypersdk-op: {op}\n$ErrorActionPreference = 'Stop'\n"
                f"$p = ConvertFrom-Json @'\n{json.dumps(params)}\n'@\n{script}")
        result = session.run_ps(text)
        if result.status_code != 0:
            message = result.std_err.decode("utf-8", "replace").strip().splitlines()
            raise Failed(f"provider {self.name!r}: {op} failed on {self.settings['host']}: "
                         f"{message[0] if message else 'exit code ' + str(result.status_code)}")
        try:
            return json.loads(result.std_out.decode("utf-8-sig"))
        except ValueError:
            raise Failed(f"provider {self.name!r}: {op}: the host answered something that is "
                         "not JSON") from None

    def map_error(self, exc: Exception, what: str) -> HyperSDKError | None:
        """pywinrm's and requests' exceptions as the service's errors; a host that answers
        429/503 (its WinRM quota) is busy for now. pywinrm does not expose response headers,
        so no Retry-After can be read: the wait doubles from `busy_retry_delay`."""
        import requests
        import winrm.exceptions

        host = self.settings["host"]
        if isinstance(exc, winrm.exceptions.InvalidCredentialsError):
            return NotAuthorized(f"provider {self.name!r}: the host {host} refused the "
                                 f"credentials of '{self.settings['username']}'")
        if isinstance(exc, requests.exceptions.SSLError):
            return NotAuthorized(f"provider {self.name!r}: the TLS certificate of {host} is not "
                                 "trusted (set ca_file, or server_cert_validation: false for a "
                                 "lab host)")
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return Unavailable(f"provider {self.name!r}: {what}: cannot reach {host} "
                               f"({type(exc).__name__})")
        if isinstance(exc, (winrm.exceptions.WinRMError, winrm.exceptions.WinRMTransportError)):
            error = Retryable if getattr(exc, "code", None) in BUSY_STATUSES else Failed
            return error(f"provider {self.name!r}: WinRM error from {host} during {what}: {exc}")
        return None

    @property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(retries=self.config.export.max_retries,
                           first_delay=self.settings["busy_retry_delay"])

    async def _ps(self, op: str, script: str, params: dict | None = None) -> Any:
        return await self.call(op, self._run_ps, op, script, params or {})

    # --------------------------------------------------------------- discovery

    async def _all_vms(self) -> list[VMInfo]:
        found = await self._ps("list_vms", LIST_VMS)
        return [self._vm_info(raw) for raw in (found if isinstance(found, list) else [found])]

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        check_filter(vm_filter, FILTER_KEYS)
        result = []
        for vm in await self._all_vms():
            if "name" in vm_filter and not fnmatch.fnmatchcase(vm.name, str(vm_filter["name"])):
                continue
            if vm_filter.get("power_state") not in (None, vm.power_state):
                continue
            if vm_filter.get("generation") not in (None, vm.extra["generation"]):
                continue
            result.append(vm)
        return result

    async def get_vm(self, identifier: str) -> VMInfo:
        vms = await self._all_vms()
        matches = [vm for vm in vms if identifier.lower() in (vm.identifier.lower(), vm.name.lower())]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InvalidArgument("vm_identifier", f"{len(matches)} VMs are named {identifier!r}; "
                                  "use the VM id")
        raise NotFound(f"no VM {identifier!r} on {self.settings['host']}"
                       f"{closest(identifier, [vm.name for vm in vms])}")

    def _vm_info(self, raw: dict) -> VMInfo:
        generation = int(raw.get("Generation") or 1)
        disks = []
        for index, disk in enumerate(raw.get("Disks") or []):
            first = (disk.get("ControllerNumber"), disk.get("ControllerLocation")) == (0, 0)
            disks.append(DiskInfo(key=f"disk-{index}", label=PureWindowsPath(disk["Path"]).name,
                                  capacity_bytes=int(disk.get("Size") or 0), location=disk["Path"],
                                  controller=str(disk.get("ControllerType", "")).lower(),
                                  boot_order=1 if first else None,
                                  file_bytes=int(disk.get("FileSize") or 0) or None))
        nics = [NicInfo(key=nic.get("Name") or f"nic-{i}", mac=_mac(nic.get("MacAddress") or ""),
                        network=nic.get("SwitchName") or "", adapter="hyperv")
                for i, nic in enumerate(raw.get("Nics") or [])]
        return VMInfo(identifier=raw["Id"], name=raw["Name"], provider=self.name,
                      power_state=POWER_STATES.get(raw.get("State", ""), "unknown"),
                      uuid=raw["Id"], cpus=int(raw.get("ProcessorCount") or 1),
                      memory_mb=int(raw.get("MemoryStartup") or 0) // (1024 * 1024),
                      firmware="uefi" if generation == 2 else "bios",
                      secure_boot=bool(raw.get("SecureBoot")), datacenter=self.settings["host"],
                      disks=disks, nics=nics,
                      extra={"generation": generation, "state": raw.get("State", "")})

    # ------------------------------------------------------------------ export

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        provider_options(options.extra, ())  # the hyperv provider takes none
        vm = await self.get_vm(identifier)
        host_dir = str(PureWindowsPath(self.settings["host_export_dir"])
                       / f"{safe_name(vm.name, 40)}-{secrets.token_hex(4)}")
        outputs = OutputFiles(target_dir)
        async with Cleanups(sink) as cleanups:
            try:
                if options.shutdown_vm and vm.power_state == "poweredOn":
                    sink.log(f"stopping {vm.name}")
                    await self._ps("stop_vm", SET_POWER, {"id": vm.identifier, "action": "stop"})
                    if options.restore_power_state:
                        cleanups.add(f"starting {vm.name} again", lambda: self._start(vm, sink))
                cleanups.add(f"removing {host_dir}", lambda: self._remove_host_dir(host_dir, sink))
                disks = await self._export_and_fetch(vm, host_dir, target_dir, options, sink,
                                                     outputs)
            except BaseException:
                outputs.discard()
                raise
        return vm, disks

    async def _start(self, vm: VMInfo, sink: ExportSink) -> None:
        sink.log(f"starting {vm.name} again")
        await self._ps("start_vm", SET_POWER, {"id": vm.identifier, "action": "start"})

    async def _export_and_fetch(self, vm: VMInfo, host_dir: str, target_dir: Path,
                                options: ExportOptions, sink: ExportSink,
                                outputs: OutputFiles) -> list[ExportedDisk]:
        """Export-VM into `host_dir` on the host, then copy its disks here."""
        sink.log(f"Export-VM {vm.name} to {host_dir} on {self.settings['host']}")
        files = await self._ps("export_vm", EXPORT_VM, {"id": vm.identifier, "dir": host_dir})
        files = files if isinstance(files, list) else [files]
        pairs = _match_files(vm, files)
        sink.add_total(sum(int(f["Length"]) for _, f in pairs))
        return await gather_bounded(
            pairs, lambda pair: self._fetch(vm, pair[0], pair[1], target_dir, options, sink,
                                            outputs),
            options.parallel_disks)

    async def _fetch(self, vm: VMInfo, disk: DiskInfo, remote: dict, target_dir: Path,
                     options: ExportOptions, sink: ExportSink, outputs: OutputFiles) -> ExportedDisk:
        remote_path = remote["Path"]
        size = int(remote["Length"])
        fmt = PureWindowsPath(remote_path).suffix.lower().lstrip(".")
        target = target_dir / f"{safe_name(vm.name, 40)}-{disk.key}.{fmt}"
        chunk = min(self.settings["read_chunk"], max(options.chunk_size, 4096))

        def read_range(offset: int, length: int) -> bytes:
            reply = self._run_ps("read_chunk", READ_CHUNK,
                                 {"path": remote_path, "offset": offset, "length": length})
            return base64.b64decode(reply["data"])

        sink.log(f"fetching {remote_path} ({size} bytes)")
        sha256 = await fetch_ranges(read_range, target, size, chunk_size=chunk,
                                    max_retries=options.max_retries, sink=sink, label=target.name,
                                    map_error=self.mapped(f"reading {remote_path}"))
        outputs.add(target)
        host_hash = await self._ps("file_hash", FILE_HASH, {"path": remote_path})
        if str(host_hash.get("sha256", "")).lower() != sha256:
            raise Failed(f"{target.name}: sha256 {sha256} differs from the host's "
                         f"Get-FileHash of {remote_path}; the copy is corrupt")
        sink.log(f"{target.name}: checksum ok (sha256 {sha256}, same as on the host)")
        return ExportedDisk(path=target, format=fmt, capacity_bytes=disk.capacity_bytes,
                            file_bytes=size, sha256=sha256, boot_order=disk.boot_order,
                            label=disk.label, key=disk.key)

    async def _remove_host_dir(self, host_dir: str, sink: ExportSink) -> None:
        try:
            await self._ps("remove_export", REMOVE_DIR, {"dir": host_dir})
            sink.log(f"removed {host_dir} on {self.settings['host']}")
        except HyperSDKError as exc:
            sink.log(f"could not remove {host_dir} on {self.settings['host']}: {exc}", "warning")


def _match_files(vm: VMInfo, files: list[dict]) -> list[tuple[DiskInfo, dict]]:
    """Pair each VM disk with the exported file of the same name."""
    by_name = {PureWindowsPath(f["Path"]).name.lower(): f for f in files
               if PureWindowsPath(f["Path"]).suffix.lower() in DISK_SUFFIXES}
    pairs = []
    for disk in vm.disks:
        found = by_name.get(disk.label.lower())
        if found is None:
            raise Failed(f"Export-VM of {vm.name} produced no file for disk {disk.label} "
                         f"(got {', '.join(sorted(by_name)) or 'none'}); differencing disks of "
                         "checkpoints are not supported: remove the checkpoints first")
        pairs.append((disk, found))
    return pairs


def _mac(raw: str) -> str:
    """'00155D010203' -> '00:15:5d:01:02:03'."""
    raw = raw.replace("-", "").replace(":", "").lower()
    return ":".join(raw[i:i + 2] for i in range(0, len(raw), 2)) if len(raw) == 12 else raw


PROVIDER_CLASS = HypervProvider

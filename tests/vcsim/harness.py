"""Build and run govmomi's vCenter simulator, and put real disk content behind its VMs.

`Simulator.start()` builds `main.go` (cached under /var/tmp/hypersdk-vcsim/<hash of
main.go>/, outside git), starts it on loopback and waits for its URL. `give_disks()`
powers a VM off, gives it disks of the requested sizes through a real
ReconfigVM_Task, and HTTP PUTs a VMDK made by qemu-img to each disk's datastore
path (`/folder/<path>?dcPath=..&dsName=..`), so a client that downloads the disk
gets real bytes.

`python -m tests.vcsim.harness --serve` runs a simulator with a prepared VM for
`make demo` and prints the URL and credentials as shell variables.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import random
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlencode, urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from tests.support.wait import wait_until

MAIN_GO = Path(__file__).with_name("main.go")
SOURCES = (MAIN_GO, MAIN_GO.with_name("cbt.go"))  # cbt.go: the simulator extensions
BUILD_ROOT = Path(os.environ.get("HYPERSDK_VCSIM_BUILD", "/var/tmp/hypersdk-vcsim"))
START_TIMEOUT = 30.0


def build_vcsim() -> Path:
    """The simulator binary for the current sources, built once per content hash."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES)).hexdigest()[:16]
    binary = BUILD_ROOT / digest / "vcsim"
    if binary.exists():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as work:
        for source in SOURCES:
            shutil.copy(source, Path(work) / source.name)
        env = dict(os.environ, GOPATH="/usr/share/gocode", GO111MODULE="off",
                   GOCACHE=str(BUILD_ROOT / "gocache"), GOFLAGS="")
        subprocess.run(["go", "build", "-o", "vcsim", *(s.name for s in SOURCES)], cwd=work, env=env,
                       check=True, capture_output=True, timeout=300)
        os.replace(Path(work) / "vcsim", binary)
    return binary


@dataclass
class VirtualDiskContent:
    """A disk as uploaded: the datastore path and the local VMDK that was PUT there."""

    datastore_path: str
    local_vmdk: Path
    capacity_bytes: int


class Simulator:
    """One running simulator process. Use as a context manager or call start()/stop()."""

    def __init__(self, *, vms: int = 2, hosts: int = 1, clusters: int = 1, cluster_hosts: int = 1,
                 datacenters: int = 1, datastores: int = 1, tls: bool = False) -> None:
        self.args = [f"-vm={vms}", f"-host={hosts}", f"-cluster={clusters}",
                     f"-cluster-host={cluster_hosts}", f"-dc={datacenters}", f"-ds={datastores}"]
        if tls:
            self.args.append("-tls")
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._workdir: tempfile.TemporaryDirectory | None = None

    def start(self) -> "Simulator":
        binary = build_vcsim()
        self._workdir = tempfile.TemporaryDirectory(prefix="hypersdk-vcsim-")
        url_file = Path(self._workdir.name) / "url"
        log = open(Path(self._workdir.name) / "vcsim.log", "wb")
        self.process = subprocess.Popen([str(binary), *self.args, f"-url-file={url_file}"],
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            wait_until(lambda: self._started(url_file), START_TIMEOUT, "the simulator's URL")
        except (AssertionError, RuntimeError):
            output = (Path(self._workdir.name) / "vcsim.log").read_text(errors="replace")
            self.stop()
            raise RuntimeError(f"the simulator did not start: {output[-2000:]}") from None
        self.url = url_file.read_text().strip()
        return self

    def _started(self, url_file: Path) -> bool:
        """Whether the simulator wrote its URL (once it listens); an error if it exited."""
        if self.process.poll() is not None:
            raise RuntimeError(f"exited with {self.process.returncode}")
        return url_file.exists()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def _parts(self):
        return urlsplit(self.url)

    @property
    def scheme(self) -> str:
        return self._parts.scheme

    @property
    def host(self) -> str:
        return self._parts.hostname or ""

    @property
    def port(self) -> int:
        return self._parts.port or 443

    @property
    def username(self) -> str:
        return self._parts.username or ""

    @property
    def password(self) -> str:
        return self._parts.password or ""

    def provider_settings(self, **overrides) -> dict:
        """A `providers.<name>` config section pointing at this simulator."""
        settings = {"type": "vsphere", "host": self.host, "port": self.port,
                    "username": self.username, "password": self.password,
                    "insecure": True, "protocol": self.scheme}
        settings.update(overrides)
        return settings

    def connect(self):
        """A pyvmomi ServiceInstance (the harness's own session, not the provider's)."""
        return SmartConnect(host=self.host, port=self.port, user=self.username,
                            pwd=self.password, protocol=self.scheme, disableSslCertValidation=True)

    def datastore_url_path(self, datastore_path: str, datacenter: str) -> str:
        """`[ds] dir/file.vmdk` -> `/folder/dir/file.vmdk?dcPath=..&dsName=..`."""
        ds_name, _, rel = datastore_path.partition("] ")
        query = urlencode({"dcPath": datacenter, "dsName": ds_name.lstrip("[")})
        return f"/folder/{quote(rel)}?{query}"

    def put_file(self, local: Path, datastore_path: str, datacenter: str) -> None:
        """Stream a local file to the datastore with HTTP PUT."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            with open(local, "rb") as body:
                conn.request("PUT", self.datastore_url_path(datastore_path, datacenter), body=body,
                             headers={"Content-Length": str(local.stat().st_size)})
            response = conn.getresponse()
            response.read()
            if response.status not in (200, 201, 204):
                raise RuntimeError(f"PUT {datastore_path}: HTTP {response.status}")
        finally:
            conn.close()


def make_vmdk(path: Path, capacity_bytes: int, seed: int, *, dense: bool = False,
              subformat: str = "monolithicSparse", noise: bool = False) -> Path:
    """A VMDK of `capacity_bytes` with `seed`-dependent data.

    Sparse (the default): 1 MiB of data at each quarter of the disk. Dense: every
    MiB holds data, so the VMDK file is as large as the disk (for benchmarks).
    With subformat monolithicFlat, `path` is a descriptor next to `<stem>-flat.vmdk`.
    The data repeats a 32-byte pattern (it compresses to almost nothing); `noise` makes
    it pseudo-random, so a streamOptimized VMDK is as large as its data.
    """
    raw = path.with_suffix(".raw")
    block = 1 << 20
    offsets = (range(0, capacity_bytes, block) if dense
               else range(0, capacity_bytes - block + 1, max(capacity_bytes // 4, block)))
    with open(raw, "wb") as handle:
        handle.truncate(capacity_bytes)
        for offset in offsets:
            handle.seek(offset)
            handle.write(random.Random(f"{seed}:{offset}").randbytes(block) if noise else
                         hashlib.sha256(f"{seed}:{offset}".encode()).digest() * (block // 32))
    try:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                        f"subformat={subformat}", str(raw), str(path)],
                       check=True, capture_output=True)
    finally:
        raw.unlink()
    return path


def find_named(si, kind: type, name: str):
    """The inventory object of type `kind` (vim.VirtualMachine, vim.Datastore, ...) named
    `name`."""
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [kind], True)
    try:
        for found in view.view:
            if found.name == name:
                return found
    finally:
        view.Destroy()
    raise LookupError(f"no {kind.__name__} named {name}")


def find_vm(si, name: str) -> vim.VirtualMachine:
    return find_named(si, vim.VirtualMachine, name)


def wait_task(task) -> None:
    """Until `task` ends, told by the property collector's updates; an error if it failed."""
    if WaitForTask(task, raiseOnError=False) != vim.TaskInfo.State.success:
        raise RuntimeError(f"task failed: {task.info.error}")


def _datacenter_of(entity) -> str:
    while entity is not None and not isinstance(entity, vim.Datacenter):
        entity = entity.parent
    return entity.name if entity is not None else ""


def power_off(vm: vim.VirtualMachine) -> None:
    if vm.runtime.powerState != vim.VirtualMachinePowerState.poweredOff:
        wait_task(vm.PowerOffVM_Task())


def _disk_specs(vm: vim.VirtualMachine, sizes: list[int]) -> list[vim.vm.device.VirtualDeviceSpec]:
    """Resize the existing disks and add new ones on the same controller, to match `sizes`."""
    devices = vm.config.hardware.device
    disks = [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]
    controller = disks[0].controllerKey
    used = {d.unitNumber for d in devices if d.controllerKey == controller}
    specs = []
    for index, size in enumerate(sizes):
        if index < len(disks):
            disk = disks[index]
            disk.capacityInKB = size // 1024
            disk.capacityInBytes = size
            specs.append(vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk))
            continue
        unit = min(u for u in range(16) if u not in used and u != 7)
        used.add(unit)
        backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
            diskMode="persistent", fileName=disks[0].backing.fileName.split("]")[0] + "]")
        disk = vim.vm.device.VirtualDisk(key=-100 - index, controllerKey=controller,
                                          unitNumber=unit, capacityInKB=size // 1024,
                                          capacityInBytes=size, backing=backing)
        specs.append(vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                                     device=disk))
    return specs


def give_disks(sim: Simulator, si, vm_name: str, sizes: list[int], workdir: Path,
               seed: int = 0, dense: bool = False, flat: bool = False,
               subformat: str = "monolithicSparse",
               noise: bool = False) -> list[VirtualDiskContent]:
    """Power the VM off, give it len(sizes) disks of those sizes, upload real VMDKs to them
    (of `subformat`, with make_vmdk's `dense` and `noise`).

    flat: upload the usual datastore layout instead, a descriptor at the disk's
    path and its `-flat.vmdk` data file next to it.
    """
    vm = find_vm(si, vm_name)
    power_off(vm)
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=_disk_specs(vm, sizes))))
    datacenter = _datacenter_of(vm)
    disks = [d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]
    uploaded = []
    for index, (disk, size) in enumerate(zip(disks, sizes)):
        backing = disk.backing.fileName
        if flat:
            folder = workdir / f"{vm_name}-upload{index + 1}"
            folder.mkdir()
            local = make_vmdk(folder / PurePosixPath(backing).name, size, seed * 100 + index,
                              dense=dense, subformat="monolithicFlat")
            for part in sorted(folder.iterdir()):
                sim.put_file(part, str(PurePosixPath(backing).with_name(part.name)), datacenter)
        else:
            local = make_vmdk(workdir / f"{vm_name}-upload{index + 1}.vmdk", size,
                              seed * 100 + index, dense=dense, subformat=subformat,
                              noise=noise)
            sim.put_file(local, backing, datacenter)
        uploaded.append(VirtualDiskContent(backing, local, size))
    return uploaded


def local_file(si, datastore_path: str) -> Path:
    """Where the simulator keeps a datastore file on this machine (its datastores are
    local directories), e.g. to change a disk's data behind a running VM's back."""
    name, _, rel = datastore_path.lstrip("[").partition("] ")
    return Path(find_named(si, vim.Datastore, name).info.url) / rel


def folder_bytes(sim: Simulator) -> int:
    """Bytes the simulator's datastore file server has sent (a simulator extension)."""
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=30)
    try:
        conn.request("GET", "/hypersdk/folder-bytes")
        return int(conn.getresponse().read())
    finally:
        conn.close()


def place_vm(sim: Simulator, si, vm_name: str, new_name: str, *, datastore: str, network: str,
             guest_id: str, size: int, workdir: Path, seed: int = 0) -> dict:
    """`vm_name` powered off and renamed `new_name`, with guest OS `guest_id`, its NIC on
    `network` (a port group or a standard network) and one disk of `size` bytes on
    `datastore` holding a real VMDK (make_vmdk). Returns what a migration must keep:
    {name, mac, network, datastore, disk}."""
    vm = find_vm(si, vm_name)
    power_off(vm)
    devices = vm.config.hardware.device
    old_disk = next(d for d in devices if isinstance(d, vim.vm.device.VirtualDisk))
    nic = next(d for d in devices if isinstance(d, vim.vm.device.VirtualEthernetCard))
    nic.backing = _nic_backing(si, network)
    backing = vim.vm.device.VirtualDisk.FlatVer2BackingInfo(diskMode="persistent",
                                                            fileName=f"[{datastore}]")
    disk = vim.vm.device.VirtualDisk(key=-101, controllerKey=old_disk.controllerKey,
                                      unitNumber=old_disk.unitNumber, capacityInKB=size // 1024,
                                      capacityInBytes=size, backing=backing)
    changes = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=old_disk),
               vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
                                               device=disk),
               vim.vm.device.VirtualDeviceSpec(operation="edit", device=nic)]
    wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(name=new_name, guestId=guest_id,
                                                        deviceChange=changes)))
    vm = find_vm(si, new_name)
    disk = next(d for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk))
    local = make_vmdk(workdir / f"{new_name}.vmdk", size, seed)
    sim.put_file(local, disk.backing.fileName, _datacenter_of(vm))
    local.unlink()
    return {"name": new_name, "mac": nic.macAddress, "network": network,
            "datastore": datastore, "disk": disk.backing.fileName}


def _nic_backing(si, network: str):
    """The backing that puts a NIC on `network`: a distributed port group or a network."""
    found = find_named(si, vim.Network, network)
    if isinstance(found, vim.dvs.DistributedVirtualPortgroup):
        port = vim.dvs.PortConnection(portgroupKey=found.key,
                                      switchUuid=found.config.distributedVirtualSwitch.uuid)
        return vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(port=port)
    return vim.vm.device.VirtualEthernetCard.NetworkBackingInfo(deviceName=network,
                                                                network=found)


def prepare_boot_vm(sim: Simulator, workdir: Path, vm_name: str, new_name: str,
                    upload_name: str = "boot.vmdk", size: int = 4 << 20) -> None:
    """`vm_name` with one disk that boots (its first sector prints
    tests.support.bootdisk.BOOT_LINE on COM1): see prepare_image_vm.
    The VMDK's embedded descriptor names its extent `upload_name`."""
    from tests.support.bootdisk import write_boot_disk  # noqa: PLC0415

    prepare_image_vm(sim, workdir, vm_name, new_name,
                     write_boot_disk(workdir / "boot.raw", size), upload_name)


def prepare_image_vm(sim: Simulator, workdir: Path, vm_name: str, new_name: str, raw: Path,
                     upload_name: str, subformat: str = "monolithicSparse",
                     guest_id: str = "", memory_mb: int = 0) -> None:
    """`vm_name` powered off with the raw disk image `raw` as its one disk (uploaded as
    a VMDK of `subformat`), no NIC (a bare libvirt has no network to put one on),
    `guest_id` as its guest OS and `memory_mb` of memory when given (the simulator's
    VMs have 32 MiB), renamed `new_name` so runs sharing a libvirt daemon do not
    collide."""
    si = sim.connect()
    try:
        vm = find_vm(si, vm_name)
        power_off(vm)
        resize = _disk_specs(vm, [raw.stat().st_size])
        wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=resize)))
        vm = find_vm(si, vm_name)
        disk = next(d for d in vm.config.hardware.device
                    if isinstance(d, vim.vm.device.VirtualDisk))
        vmdk = workdir / upload_name
        subprocess.run(["qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={subformat}",
                        str(raw), str(vmdk)], check=True, capture_output=True)
        sim.put_file(vmdk, disk.backing.fileName, _datacenter_of(vm))
        nics = [vim.vm.device.VirtualDeviceSpec(operation="remove", device=device)
                for device in vm.config.hardware.device
                if isinstance(device, vim.vm.device.VirtualEthernetCard)]
        wait_task(vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(
            name=new_name, deviceChange=nics, guestId=guest_id or None,
            memoryMB=memory_mb or None)))
    finally:
        Disconnect(si)


def _serve(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="hypersdk-vcsim-demo-"))
    with Simulator(vms=args.vms) as sim:
        si = sim.connect()
        give_disks(sim, si, args.vm, [args.disk_mib << 20, (args.disk_mib // 2 or 1) << 20],
                   workdir)
        Disconnect(si)
        print(f"VCSIM_URL={sim.url}\nVCSIM_HOST={sim.host}\nVCSIM_PORT={sim.port}\n"
              f"VCSIM_USER={sim.username}\nVCSIM_PASSWORD={sim.password}\n"
              f"VCSIM_VM={args.vm}", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run a simulator until interrupted")
    parser.add_argument("--vms", type=int, default=2, help="VMs per host and cluster")
    parser.add_argument("--vm", default="DC0_H0_VM0", help="the VM that gets two real disks")
    parser.add_argument("--disk-mib", type=int, default=64, help="size of the first disk")
    args = parser.parse_args()
    if not args.serve:
        print(build_vcsim())
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    _serve(args)


if __name__ == "__main__":
    main()

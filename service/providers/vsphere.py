"""The vSphere provider (vCenter or ESXi through pyvmomi): discovery, details, export.

Sessions come from a per-endpoint pool (`vsphere_session`), the inventory from one
PropertyCollector round trip (`vsphere_inventory`), vSphere tags from the vAPI REST
endpoint when they can be read (`vsphere_tags`; optional: without them a listing or an
export goes on, with a warning), and the disk transfer from
`vsphere_export` (NFC export lease when the server offers it, else the datastore's
/folder HTTP interface). This module wires them together and handles the power
state around an export (guest shutdown, power-off, restore).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from ..config_schema import Field
from ..errors import Failed, NotFound
from ..model import ExportOptions, ExportSink, ExportedDisk, VMInfo
from .base import Provider
from .common import closest, private_file_rule, provider_options, shutdown_timeout
from .vsphere_session import SessionPool, finish_config, host_rule
from .vsphere_tags import SessionTags

SDK_MODULES = ()  # pyvmomi is a core dependency
DEFAULT_SHUTDOWN_TIMEOUT = 300.0

CONFIG_SCHEMA = {
    "host": Field("str", check=host_rule, doc="vCenter or ESXi host name, optionally :PORT"),
    "port": Field("int", None, minimum=1, doc="443 unless host names the port"),
    "protocol": Field("str", "https", choices=("https", "http"),
                      doc="http only for simulators on loopback"),
    "username": Field("str"),
    "password": Field("str", "", secret=True, doc="use ${VSPHERE_PASSWORD}, never a literal"),
    "password_file": Field("str", "", check=private_file_rule),
    "insecure": Field("bool", False, doc="skip TLS certificate verification"),
    "connection_pool_size": Field("int", 2, minimum=1),
    "timeout": Field("duration", 60.0, doc="socket timeout of every call"),
}
CONFIG_FINISH = finish_config  # a port written in host ("vc:8443") becomes `port`


class VSphereProvider(Provider):
    kind = "vsphere"
    warm_unsupported = ""  # changed block tracking: vsphere_warm.py

    def __init__(self, name: str, settings: dict, config) -> None:
        super().__init__(name, settings, config)
        self.pool = SessionPool(name, settings)
        self.tags = SessionTags(self.pool)

    async def _inventory(self) -> list[VMInfo]:
        """Every VM, with its vSphere tags (vAPI REST) when they can be read."""
        from .vsphere_inventory import fetch_inventory

        vms = await self.pool.run(fetch_inventory, self.name)
        await self.tags.add_to(vms)
        return vms

    async def list_vms(self, vm_filter: dict) -> list[VMInfo]:
        from .vsphere_inventory import check_filter, filter_vms

        checked = check_filter(vm_filter)
        return filter_vms(await self._inventory(), checked)

    async def get_vm(self, identifier: str) -> VMInfo:
        vms = await self._inventory()
        wanted = identifier.strip("/")
        for match in (lambda vm: vm.identifier == wanted, lambda vm: vm.path == wanted,
                      lambda vm: vm.name == wanted):
            found = [vm for vm in vms if match(vm)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                paths = ", ".join(f"{vm.path} ({vm.identifier})" for vm in found)
                raise NotFound(f"{len(found)} VMs are named {identifier!r} on {self.pool.where}: "
                               f"{paths}; use the id or the inventory path")
        hint = closest(identifier, sorted({vm.name for vm in vms}))
        raise NotFound(f"no VM {identifier!r} on {self.pool.where}{hint}")

    async def export_disks(self, identifier: str, target_dir: Path, options: ExportOptions,
                           sink: ExportSink) -> tuple[VMInfo, list[ExportedDisk]]:
        from .vsphere_export import export_vm_disks

        provider_options(options.extra, ())  # the vsphere provider takes none
        vm = await self.get_vm(identifier)
        if "tags_unavailable" in vm.extra:
            sink.log(f"{vm.name}: {vm.extra['tags_unavailable']}; exporting without them",
                     "warning")
        original = vm.power_state
        await self._make_powered_off(vm, options, sink)
        try:
            disks = await export_vm_disks(self.pool, vm, Path(target_dir), options, sink)
        finally:
            if options.restore_power_state and original == "poweredOn":
                await self._power_on(vm, sink)
        return vm, disks

    async def warm_source(self, identifier: str, options: ExportOptions,
                          sink: ExportSink):
        """The VM for warm migration (vsphere_warm.py), changed block tracking on. At
        cutover the guest is shut down (powered off after options' shutdown_timeout)."""
        from .vsphere_warm import VSphereWarmSource, enable_change_tracking

        provider_options(options.extra, ())
        vm = await self.get_vm(identifier)
        if await self.pool.run(enable_change_tracking, vm.identifier):
            sink.log(f"enabled changed block tracking on {vm.name}")
        forced = dataclasses.replace(options, shutdown_vm=True)

        async def shut_down() -> None:
            state = await self.pool.run(_current_power_state, vm.identifier)
            await self._make_powered_off(dataclasses.replace(vm, power_state=state), forced,
                                         sink)

        return VSphereWarmSource(self.pool, vm, sink, shut_down)

    async def _make_powered_off(self, vm: VMInfo, options: ExportOptions, sink: ExportSink) -> None:
        if vm.power_state == "poweredOff":
            return
        if not options.shutdown_vm:
            raise Failed(f"VM {vm.name} ({vm.identifier}) is {vm.power_state}: the disks of a "
                         f"running VM are not consistent; power it off or set "
                         f"options.shutdown_vm: true")
        timeout = shutdown_timeout(options.extra, DEFAULT_SHUTDOWN_TIMEOUT)
        sink.log(f"shutting down the guest of {vm.name} (up to {timeout:g}s)")
        state = await self.pool.run(_shutdown_guest, vm.identifier, timeout)
        if state != "poweredOff":
            sink.log(f"guest of {vm.name} did not stop ({state}); powering off", "warning")
            await self.pool.run(_power_task, vm.identifier, "off")
        sink.log(f"{vm.name} is powered off")

    async def _power_on(self, vm: VMInfo, sink: ExportSink) -> None:
        sink.log(f"restoring the power state of {vm.name}: powering on")
        await asyncio.shield(self.pool.run(_power_task, vm.identifier, "on"))

    async def close(self) -> None:
        await self.pool.close()


def vm_ref(si, identifier: str):
    from pyVmomi import vim

    return vim.VirtualMachine(identifier, si._stub)


def _power_state(vm) -> str:
    return str(vm.runtime.powerState)


def _current_power_state(si, identifier: str) -> str:
    return _power_state(vm_ref(si, identifier))


def _shutdown_guest(si, identifier: str, timeout: float) -> str:
    """Ask the guest to shut down and wait up to `timeout`; the final power state (blocking)."""
    from pyVmomi import vim

    vm = vm_ref(si, identifier)
    try:
        vm.ShutdownGuest()
    except (vim.fault.ToolsUnavailable, vim.fault.InvalidState):
        return _power_state(vm)
    deadline = time.monotonic() + timeout
    while _power_state(vm) != "poweredOff" and time.monotonic() < deadline:
        time.sleep(1.0)
    return _power_state(vm)


def _power_task(si, identifier: str, which: str) -> None:
    vm = vm_ref(si, identifier)
    task = vm.PowerOffVM_Task() if which == "off" else vm.PowerOnVM_Task()
    wait_task(task, f"power {which} {identifier}")


def wait_task(task, what: str) -> object:
    """Wait for a vSphere task (blocking); Failed with the server's message if it fails."""
    from pyVmomi import vim

    while (state := _task_field(task, "info.state")) in (vim.TaskInfo.State.queued,
                                                         vim.TaskInfo.State.running):
        time.sleep(0.2)
    if state != vim.TaskInfo.State.success:
        error = _task_field(task, "info.error")
        raise Failed(f"{what} failed: {getattr(error, 'msg', None) or error}")
    return _task_field(task, "info.result")


def _task_field(task, path: str) -> object:
    """One property of a task, read alone: the whole `info` of a snapshot task names the
    snapshot as its entity on some servers (govmomi's simulator), which pyvmomi refuses."""
    from pyVmomi import vim, vmodl

    collector = vim.ServiceInstance("ServiceInstance", task._stub).content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=task)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=vim.Task, pathSet=[path])])
    for content in collector.RetrieveContents([spec]) or []:
        for prop in content.propSet or []:
            return prop.val
    return None


PROVIDER_CLASS = VSphereProvider

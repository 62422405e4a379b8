"""FakeArmServer: a local HTTPS server answering the Azure Resource Manager REST shapes
that azure-mgmt-compute sends for VMs, VM sizes, disks and snapshots.

There is no local ARM to test against, so this is a fake, kept to the documented
request/response shapes: list pages `{"value": [...]}`, `$expand=instanceView`,
long-running POSTs answered 202 + `Location` and polled, PUT/DELETE answered 200,
errors as `{"error": {"code", "message"}}`, 401 for a wrong bearer token, and 429 +
`Retry-After` when a test asks for throttling. Grants return a SAS URL that the
test supplies (an Azurite blob, or a URL that stalls).
"""
from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

SUB = "00000000-0000-0000-0000-000000000001"
TOKEN = "fake-arm-token"


@dataclass
class Call:
    method: str
    path: str
    time: float
    body: dict | None


@dataclass
class FakeArmState:
    vms: dict[str, dict] = field(default_factory=dict)            # name -> VM JSON
    disks: dict[str, dict] = field(default_factory=dict)          # name -> disk JSON
    snapshots: dict[str, dict] = field(default_factory=dict)      # name -> snapshot JSON
    nics: dict[str, dict] = field(default_factory=dict)           # name -> network interface JSON
    sas_for_disk: Callable[[str], str] = lambda disk: ""          # disk name -> SAS URL
    throttle: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, path end) -> 429s
    calls: list[Call] = field(default_factory=list)
    # set: a snapshot PUT is stored at once but answered only when the event is set
    hold_snapshot_answer: asyncio.Event | None = None

    def calls_to(self, method: str, ending: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path.endswith(ending)]


def rg_id(group: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{group}"


def add_vm(state: FakeArmState, group: str, name: str, *, power: str = "running",
           tags: dict | None = None, disks: list[tuple[str, int]], size: str = "Standard_D2s_v3",
           generation: str = "V2") -> None:
    """A VM with managed disks [(name, size_bytes)]: the first is the OS disk."""
    prefix = f"{rg_id(group)}/providers/Microsoft.Compute"
    for disk_name, size_bytes in disks:
        state.disks[disk_name] = {
            "id": f"{prefix}/disks/{disk_name}", "name": disk_name, "location": "westeurope",
            "type": "Microsoft.Compute/disks",
            "properties": {"diskSizeGB": max(1, size_bytes // 1024 ** 3), "diskSizeBytes": size_bytes,
                           "hyperVGeneration": generation, "diskState": "Attached",
                           "provisioningState": "Succeeded"}}
    nic_id = f"{rg_id(group)}/providers/Microsoft.Network/networkInterfaces/{name}-nic"
    state.nics[f"{name}-nic"] = {
        "id": nic_id, "name": f"{name}-nic", "location": "westeurope",
        "properties": {"macAddress": f"00-0D-3A-00-00-{len(state.nics) + 1:02X}", "primary": True,
                       "ipConfigurations": [{"name": "ipconfig1", "properties": {"subnet": {
                           "id": f"{rg_id(group)}/providers/Microsoft.Network/virtualNetworks/"
                                 f"vnet1/subnets/default"}}}]}}
    os_name, *data = [d for d, _ in disks]
    state.vms[name] = {
        "id": f"{prefix}/virtualMachines/{name}", "name": name, "location": "westeurope",
        "type": "Microsoft.Compute/virtualMachines", "tags": tags or {},
        "properties": {
            "vmId": f"vm-uuid-{name}", "hardwareProfile": {"vmSize": size},
            "provisioningState": "Succeeded",
            "storageProfile": {
                "osDisk": {"osType": "Linux", "name": os_name, "createOption": "FromImage",
                           "managedDisk": {"id": f"{prefix}/disks/{os_name}"}},
                "dataDisks": [{"lun": lun, "name": d, "createOption": "Empty",
                               "managedDisk": {"id": f"{prefix}/disks/{d}"}}
                              for lun, d in enumerate(data)]},
            "networkProfile": {"networkInterfaces": [{"id": nic_id}]},
            "securityProfile": {"uefiSettings": {"secureBootEnabled": True}} if generation == "V2" else {},
        },
        "_power": power,
    }


VM_SIZES = [{"name": "Standard_D2s_v3", "numberOfCores": 2, "memoryInMB": 8192,
             "maxDataDiskCount": 4, "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": 16384},
            {"name": "Standard_B1s", "numberOfCores": 1, "memoryInMB": 1024,
             "maxDataDiskCount": 2, "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": 4096}]


def _error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


class FakeArmServer:
    """aiohttp app on 127.0.0.1 over TLS; `base_url` goes to the SDK client's base_url."""

    def __init__(self, state: FakeArmState, ssl_context: ssl.SSLContext) -> None:
        self.state = state
        self._ssl = ssl_context
        self._ops: dict[str, dict | None] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        base = "/subscriptions/{sub}"
        rg = base + "/resourceGroups/{rg}/providers/Microsoft.Compute"
        app.router.add_get(base + "/providers/Microsoft.Compute/virtualMachines", self.list_all)
        app.router.add_get(base + "/providers/Microsoft.Compute/locations/{loc}/vmSizes", self.sizes)
        app.router.add_get(rg + "/virtualMachines", self.list_group)
        app.router.add_get(rg + "/virtualMachines/{name}", self.get_vm)
        app.router.add_post(rg + "/virtualMachines/{name}/{action}", self.power)
        app.router.add_get(rg + "/disks/{name}", self.get_disk)
        app.router.add_get(base + "/resourceGroups/{rg}/providers/Microsoft.Network/"
                                  "networkInterfaces/{name}", self.get_nic)
        app.router.add_put(rg + "/snapshots/{name}", self.put_snapshot)
        app.router.add_delete(rg + "/snapshots/{name}", self.delete_snapshot)
        app.router.add_post(rg + "/{kind}/{name}/{action}", self.access)
        app.router.add_get("/operations/{op}", self.operation)
        app.router.add_get("/stall/{blob:.*}", self.stall)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self._ssl)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.base_url = f"https://127.0.0.1:{port}"

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.state.calls.append(Call(request.method, request.path, time.monotonic(), body))
        if request.path.startswith("/stall/"):
            return await handler(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _error(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if request.path.startswith("/subscriptions/") and not request.query.get("api-version"):
            return _error(400, "MissingApiVersionParameter", "The api-version query parameter is required.")
        for (method, ending), left in self.state.throttle.items():
            if left and request.method == method and request.path.endswith(ending):
                self.state.throttle[(method, ending)] = left - 1
                return _error(429, "TooManyRequests", "Throttled", headers={"Retry-After": "1"})
        return await handler(request)

    def _vm_json(self, vm: dict, expand: bool) -> dict:
        data = {k: v for k, v in vm.items() if not k.startswith("_")}
        if expand:
            data["properties"] = dict(data["properties"], instanceView={"statuses": [
                {"code": "ProvisioningState/succeeded"}, {"code": f"PowerState/{vm['_power']}"}]})
        return data

    def _vms(self, request: web.Request, group: str | None) -> web.Response:
        expand = request.query.get("$expand") == "instanceView"
        vms = [self._vm_json(vm, expand) for vm in self.state.vms.values()
               if group is None or vm["id"].startswith(rg_id(group) + "/")]
        return web.json_response({"value": vms})

    async def list_all(self, request: web.Request) -> web.Response:
        return self._vms(request, None)

    async def list_group(self, request: web.Request) -> web.Response:
        group = request.match_info["rg"]
        if not any(vm["id"].startswith(rg_id(group) + "/") for vm in self.state.vms.values()):
            # the fake knows a resource group only through its VMs
            return _error(404, "ResourceGroupNotFound", f"Resource group '{group}' could not be found.")
        return self._vms(request, group)

    async def sizes(self, request: web.Request) -> web.Response:
        return web.json_response({"value": VM_SIZES})

    async def get_vm(self, request: web.Request) -> web.Response:
        vm = self.state.vms.get(request.match_info["name"])
        if vm is None or not vm["id"].startswith(rg_id(request.match_info["rg"]) + "/"):
            return _error(404, "ResourceNotFound", f"The Resource '{request.match_info['name']}' was not found.")
        return web.json_response(self._vm_json(vm, request.query.get("$expand") == "instanceView"))

    def _accepted(self, request: web.Request, result: dict | None) -> web.Response:
        op = str(next(self._ids))
        self._ops[op] = result
        return web.Response(status=202, headers={
            "Location": f"{self.base_url}/operations/{op}", "Retry-After": "0"})

    async def operation(self, request: web.Request) -> web.Response:
        result = self._ops.get(request.match_info["op"])
        return web.json_response(result) if result is not None else web.Response(status=200)

    async def power(self, request: web.Request) -> web.Response:
        vm = self.state.vms.get(request.match_info["name"])
        action = request.match_info["action"]
        if vm is None or action not in ("deallocate", "start", "powerOff"):
            return _error(404, "NotFound", "no such VM or action")
        vm["_power"] = {"deallocate": "deallocated", "start": "running",
                        "powerOff": "stopped"}[action]
        return self._accepted(request, None)

    async def get_disk(self, request: web.Request) -> web.Response:
        disk = self.state.disks.get(request.match_info["name"])
        if disk is None:
            return _error(404, "ResourceNotFound", "disk not found")
        return web.json_response(disk)

    async def get_nic(self, request: web.Request) -> web.Response:
        nic = self.state.nics.get(request.match_info["name"])
        if nic is None:
            return _error(404, "ResourceNotFound", "network interface not found")
        return web.json_response(nic)

    async def put_snapshot(self, request: web.Request) -> web.Response:
        body = await request.json()
        source = body["properties"]["creationData"]["sourceResourceId"]
        name = request.match_info["name"]
        snapshot = {"id": request.path, "name": name, "location": body["location"],
                    "tags": body.get("tags", {}),
                    "properties": {**body["properties"], "provisioningState": "Succeeded",
                                   "_disk": source.rsplit("/", 1)[-1]}}
        self.state.snapshots[name] = snapshot
        if self.state.hold_snapshot_answer is not None:
            await self.state.hold_snapshot_answer.wait()
        return web.json_response(snapshot)

    async def delete_snapshot(self, request: web.Request) -> web.Response:
        self.state.snapshots.pop(request.match_info["name"], None)
        return web.Response(status=200)

    async def access(self, request: web.Request) -> web.Response:
        kind, name, action = (request.match_info[k] for k in ("kind", "name", "action"))
        store = {"disks": self.state.disks, "snapshots": self.state.snapshots}.get(kind)
        if store is None or name not in store or action not in ("beginGetAccess", "endGetAccess"):
            return _error(404, "ResourceNotFound", f"{kind}/{name}/{action} not found")
        if action == "endGetAccess":
            return self._accepted(request, None)
        body = await request.json()
        if body.get("access") != "Read" or not isinstance(body.get("durationInSeconds"), int):
            return _error(400, "InvalidParameter", "access and durationInSeconds are required")
        disk = name if kind == "disks" else store[name]["properties"]["_disk"]
        return self._accepted(request, {"accessSAS": self.state.sas_for_disk(disk)})

    async def stall(self, request: web.Request) -> web.StreamResponse:
        """A blob download that sends headers and a little data, then nothing until stop()."""
        size = 1 << 30
        headers = {"Content-Length": str(size), "x-ms-blob-type": "BlockBlob"}
        if request.method == "HEAD":  # the blob's properties
            return web.Response(headers=headers)
        first, _, last = request.headers.get("x-ms-range", "bytes=0-").split("=")[1].partition("-")
        last = last or str(size - 1)
        headers.update({"Content-Length": str(int(last) - int(first) + 1),
                        "Content-Range": f"bytes {first}-{last}/{size}"})
        response = web.StreamResponse(status=206, headers=headers)
        await response.prepare(request)
        await response.write(b"\0" * 4096)
        await self._stopping.wait()
        return response

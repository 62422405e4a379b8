"""`FakeWinRMServer`: a WS-Management endpoint (HTTP, Basic auth) as pywinrm speaks it —
Create shell, Command, Receive (output in several pieces), Signal, Delete — in front
of a fake Hyper-V host.

There is no PowerShell here: the fake recognises the provider's scripts by their
`# hypersdk-op:` first line, reads their JSON parameters from the here-string and
answers as the real cmdlets would (`ConvertTo-Json` output). It is a test double for
the host; the WS-Man exchange and pywinrm are real.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

from aiohttp import web

NS = {"s": "http://www.w3.org/2003/05/soap-envelope",
      "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
      "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
      "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"}
SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
PIECE = 48 * 1024     # stdout bytes per Receive answer, as WinRM splits long output


@dataclass
class FakeWinRMServer:
    username: str
    password: str
    url: str = ""
    ca_file: str = ""               # set when served over HTTPS
    vms: list[dict] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)   # Windows path (lower) -> bytes
    ops: list[str] = field(default_factory=list)
    drop_receives: int = 0          # close the connection on this many Receive requests
    corrupt_hash: bool = False      # Get-FileHash answers a wrong digest
    busy: int = 0                   # answer this many shell Creates with 503 (quota)
    creates: int = 0
    _commands: dict[str, dict] = field(default_factory=dict)

    # ------------------------------------------------------------ host setup

    def add_vm(self, name: str, disks: dict[str, bytes], *, generation=2, state="Running",
               cpus=2, memory_mb=4096) -> str:
        vm_id = str(uuid.uuid4())
        drives = []
        for index, (file_name, content) in enumerate(disks.items()):
            path = f"C:\\Hyper-V\\{name}\\Virtual Hard Disks\\{file_name}"
            self.files[path.lower()] = content
            drives.append({"Path": path, "ControllerType": "SCSI" if generation == 2 else "IDE",
                           "ControllerNumber": 0, "ControllerLocation": index,
                           "Size": 64 << 30, "FileSize": len(content)})
        self.vms.append({"Id": vm_id, "Name": name, "State": state, "Generation": generation,
                         "ProcessorCount": cpus, "MemoryStartup": memory_mb << 20,
                         "SecureBoot": generation == 2, "Notes": "", "Disks": drives,
                         "Nics": [{"Name": "Network Adapter", "MacAddress": "00155D0A0B0C",
                                   "SwitchName": "External"}]})
        return vm_id

    def exported_files(self) -> list[str]:
        return [p for p in self.files if "\\hypersdk\\exports\\" in p]

    # ------------------------------------------------------- the fake host

    def _vm(self, vm_id: str) -> dict:
        return next(vm for vm in self.vms if vm["Id"] == vm_id)

    def run(self, script: str) -> tuple[bytes, bytes, int]:
        match = re.match(r"# hypersdk-op: (\w+)\n", script)
        params_text = re.search(r"@'\n(.*?)\n'@", script, re.S)
        if not match or not params_text:
            return b"", b"The term is not recognized as the name of a cmdlet", 1
        op, params = match.group(1), json.loads(params_text.group(1))
        self.ops.append(op)
        try:
            result = getattr(self, f"op_{op}")(params)
        except KeyError as exc:
            return b"", f"Cannot find path '{exc.args[0]}' because it does not exist.".encode(), 1
        return json.dumps(result).encode("utf-8"), b"", 0

    def op_list_vms(self, params):
        return self.vms

    def op_stop_vm(self, params):
        self._vm(params["id"])["State"] = "Off"
        return {"ok": True}

    def op_start_vm(self, params):
        self._vm(params["id"])["State"] = "Running"
        return {"ok": True}

    def op_export_vm(self, params):
        vm = self._vm(params["id"])
        out = []
        for drive in vm["Disks"]:
            name = drive["Path"].rpartition("\\")[2]
            path = f"{params['dir']}\\{vm['Name']}\\Virtual Hard Disks\\{name}"
            self.files[path.lower()] = self.files[drive["Path"].lower()]
            out.append({"Path": path, "Length": len(self.files[path.lower()])})
        return out

    def op_read_chunk(self, params):
        content = self.files[params["path"].lower()]
        piece = content[params["offset"]:params["offset"] + params["length"]]
        return {"data": base64.b64encode(piece).decode()}

    def op_file_hash(self, params):
        digest = hashlib.sha256(self.files[params["path"].lower()]).hexdigest().upper()
        return {"sha256": ("0" * 64) if self.corrupt_hash else digest}

    def op_remove_export(self, params):
        prefix = params["dir"].lower() + "\\"
        for path in [p for p in self.files if p.startswith(prefix)]:
            del self.files[path]
        return {"ok": True}

    # ----------------------------------------------------------- WS-Man

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/wsman", self.wsman)
        return app

    def _authorized(self, request: web.Request) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return request.headers.get("Authorization") == f"Basic {expected}"

    async def wsman(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="WSMAN"'})
        from xml.etree import ElementTree as ET

        root = ET.fromstring(await request.read())
        action = root.findtext(".//a:Action", namespaces=NS) or ""
        message_id = root.findtext(".//a:MessageID", namespaces=NS) or ""
        verb = action.rpartition("/")[2]
        if verb == "Create":
            self.creates += 1
            if self.busy:
                self.busy -= 1
                return web.Response(status=503, headers={"Retry-After": "1"})
            shell_id = str(uuid.uuid4()).upper()
            body = (f'<x:ResourceCreated xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer">'
                    f'<a:ReferenceParameters><w:SelectorSet><w:Selector Name="ShellId">{shell_id}'
                    f'</w:Selector></w:SelectorSet></a:ReferenceParameters></x:ResourceCreated>'
                    f'<rsp:Shell><rsp:ShellId>{shell_id}</rsp:ShellId></rsp:Shell>')
        elif verb == "Command":
            command = root.findtext(".//rsp:Command", namespaces=NS) or ""
            encoded = command.split("-encodedcommand", 1)[1].strip()
            script = base64.b64decode(encoded).decode("utf-16-le")
            stdout, stderr, code = self.run(script)
            command_id = str(uuid.uuid4()).upper()
            self._commands[command_id] = {"stdout": stdout, "stderr": stderr, "code": code}
            body = (f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId>"
                    f"</rsp:CommandResponse>")
        elif verb == "Receive":
            if self.drop_receives:
                self.drop_receives -= 1
                request.transport.close()
                return web.Response(status=500)
            command_id = root.find(".//rsp:DesiredStream", NS).get("CommandId")
            body = self._receive(command_id)
        elif verb == "Signal":
            self._commands.pop(root.find(".//rsp:Signal", NS).get("CommandId"), None)
            body = "<rsp:SignalResponse/>"
        elif verb == "Delete":
            body = ""
        else:
            return web.Response(status=400, text=f"unknown action {action}")
        return web.Response(body=_envelope(action, message_id, body).encode(),
                            content_type="application/soap+xml", charset="UTF-8")

    def _receive(self, command_id: str) -> str:
        command = self._commands[command_id]
        out, command["stdout"] = command["stdout"][:PIECE], command["stdout"][PIECE:]
        streams = f'<rsp:Stream Name="stdout" CommandId="{command_id}">' \
                  f'{base64.b64encode(out).decode()}</rsp:Stream>'
        if command["stdout"]:
            state = f'<rsp:CommandState CommandId="{command_id}" State="{SHELL}/CommandState/Running"/>'
        else:
            if command["stderr"]:
                streams += f'<rsp:Stream Name="stderr" CommandId="{command_id}">' \
                           f'{base64.b64encode(command["stderr"]).decode()}</rsp:Stream>'
            state = (f'<rsp:CommandState CommandId="{command_id}" State="{SHELL}/CommandState/Done">'
                     f'<rsp:ExitCode>{command["code"]}</rsp:ExitCode></rsp:CommandState>')
        return f"<rsp:ReceiveResponse>{streams}{state}</rsp:ReceiveResponse>"


def _envelope(action: str, relates_to: str, body: str) -> str:
    xmlns = " ".join(f'xmlns:{k}="{v}"' for k, v in NS.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?><s:Envelope {xmlns}><s:Header>'
            f"<a:Action>{action}Response</a:Action><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
            f"<a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body>{body}</s:Body>"
            f"</s:Envelope>")

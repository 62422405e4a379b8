"""`FakeOciServer`: the OCI Compute, Block Storage and Object Storage REST calls the
provider makes, in memory — a test double answering the documented request shapes.

Every API request must carry a valid OCI HTTP signature (draft-cavage, rsa-sha256)
made with a key the test registered; anything else is a 401 like the real service.
Pre-authenticated request URLs are served without a signature, with Range support
and an optional connection drop after N bytes. `throttle` queues 429 answers with a
Retry-After header.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
import re
import secrets
import time
from dataclasses import dataclass, field

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

API = "/20160918"
AD = "Uocm:PHX-AD-1"


def ocid(kind: str) -> str:
    return f"ocid1.{kind}.oc1.phx.{secrets.token_hex(12)}"


@dataclass
class FakeOciServer:
    compartment: str
    namespace: str = "testns"
    url: str = ""
    keys: dict[str, object] = field(default_factory=dict)      # keyId -> RSA public key
    instances: dict[str, dict] = field(default_factory=dict)
    boot_volumes: dict[str, dict] = field(default_factory=dict)
    volumes: dict[str, dict] = field(default_factory=dict)
    boot_attachments: list[dict] = field(default_factory=list)
    volume_attachments: list[dict] = field(default_factory=list)
    vnics: dict[str, dict] = field(default_factory=dict)
    vnic_attachments: list[dict] = field(default_factory=list)
    disk_content: dict[str, bytes] = field(default_factory=dict)   # boot volume id -> bytes
    images: dict[str, dict] = field(default_factory=dict)      # custom images made by exports
    base_images: dict[str, dict] = field(default_factory=dict)  # platform images instances use
    objects: dict[tuple[str, str], bytes] = field(default_factory=dict)   # (bucket, name)
    pars: dict[str, dict] = field(default_factory=dict)
    throttle: list[float] = field(default_factory=list)   # Retry-After values to answer first
    drop_after: int | None = None     # cut the next PAR download after this many bytes
    export_fails: bool = False
    export_hangs: bool = False        # the export never finishes (for cancellation)
    page_size: int = 0                # >0: list calls answer in pages (opc-next-page)
    # "create_image" / "create_par": made at once, answered only when the event is set
    hold_answer: dict[str, asyncio.Event] = field(default_factory=dict)
    calls: list[tuple[float, str]] = field(default_factory=list)
    par_gets: list[str] = field(default_factory=list)     # Range header of each PAR GET
    _seq: itertools.count = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------- test setup

    def add_instance(self, name: str, boot: bytes, *, state="RUNNING", tags=None, uefi=False,
                     block_volumes: int = 0) -> str:
        inst_id = ocid("instance")
        boot_id = ocid("bootvolume")
        self.boot_volumes[boot_id] = {"id": boot_id, "displayName": f"{name} (Boot Volume)",
                                      "sizeInGBs": 47, "availabilityDomain": AD,
                                      "compartmentId": self.compartment,
                                      "lifecycleState": "AVAILABLE"}
        self.disk_content[boot_id] = boot
        self.boot_attachments.append({"id": ocid("bootvolumeattachment"), "instanceId": inst_id,
                                      "bootVolumeId": boot_id, "availabilityDomain": AD,
                                      "compartmentId": self.compartment,
                                      "lifecycleState": "ATTACHED"})
        for index in range(block_volumes):
            vol_id = ocid("volume")
            self.volumes[vol_id] = {"id": vol_id, "displayName": f"{name}-data{index}",
                                    "sizeInGBs": 100, "availabilityDomain": AD,
                                    "compartmentId": self.compartment,
                                    "lifecycleState": "AVAILABLE"}
            self.volume_attachments.append({"id": ocid("volumeattachment"), "instanceId": inst_id,
                                            "volumeId": vol_id, "availabilityDomain": AD,
                                            "compartmentId": self.compartment,
                                            "attachmentType": "paravirtualized",
                                            "lifecycleState": "ATTACHED"})
        vnic_id = ocid("vnic")
        self.vnics[vnic_id] = {"id": vnic_id, "macAddress": "02:00:17:AA:BB:CC",
                               "subnetId": "ocid1.subnet.oc1.phx.subnet1", "isPrimary": True,
                               "availabilityDomain": AD, "compartmentId": self.compartment,
                               "lifecycleState": "AVAILABLE",
                               "timeCreated": "2026-01-01T00:00:00.000Z"}
        self.vnic_attachments.append({"id": ocid("vnicattachment"), "instanceId": inst_id,
                                      "vnicId": vnic_id, "nicIndex": 0,
                                      "availabilityDomain": AD, "compartmentId": self.compartment,
                                      "subnetId": "ocid1.subnet.oc1.phx.subnet1",
                                      "lifecycleState": "ATTACHED",
                                      "timeCreated": "2026-01-01T00:00:00.000Z"})
        image_id = ocid("image")
        self.base_images[image_id] = {"id": image_id, "displayName": "Oracle-Linux-8.9",
                                      "operatingSystem": "Oracle Linux",
                                      "operatingSystemVersion": "8", "compartmentId": None,
                                      "lifecycleState": "AVAILABLE", "createImageAllowed": True,
                                      "timeCreated": "2026-01-01T00:00:00.000Z"}
        self.instances[inst_id] = {
            "imageId": image_id,
            "id": inst_id, "displayName": name, "lifecycleState": state,
            "availabilityDomain": AD, "compartmentId": self.compartment, "region": "phx",
            "shape": "VM.Standard.E4.Flex",
            "shapeConfig": {"ocpus": 2.0, "vcpus": 4, "memoryInGBs": 16.0},
            "launchOptions": {"firmware": "UEFI_64" if uefi else "BIOS"},
            "freeformTags": tags or {}, "timeCreated": "2026-01-01T00:00:00.000Z",
        }
        return inst_id

    # ------------------------------------------------------------------ server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        r = app.router
        r.add_get(f"{API}/instances", self.list_instances)
        r.add_get(f"{API}/instances/{{id}}", self.get_instance)
        r.add_get(f"{API}/bootVolumeAttachments", self.list_boot_attachments)
        r.add_get(f"{API}/volumeAttachments", self.list_volume_attachments)
        r.add_get(f"{API}/vnicAttachments", self.list_vnic_attachments)
        r.add_get(f"{API}/vnics/{{id}}", self.get_vnic)
        r.add_get(f"{API}/bootVolumes/{{id}}", self.get_boot_volume)
        r.add_get(f"{API}/volumes/{{id}}", self.get_volume)
        r.add_post(f"{API}/images", self.create_image)
        r.add_get(f"{API}/images/{{id}}", self.get_image)
        r.add_post(f"{API}/images/{{id}}/actions/export", self.export_image)
        r.add_delete(f"{API}/images/{{id}}", self.delete_image)
        r.add_get("/n", self.get_namespace)
        r.add_get("/n/", self.get_namespace)
        r.add_route("HEAD", "/n/{ns}/b/{bucket}/o/{name:.+}", self.head_object)
        r.add_delete("/n/{ns}/b/{bucket}/o/{name:.+}", self.delete_object)
        r.add_post("/n/{ns}/b/{bucket}/p", self.create_par)
        r.add_post("/n/{ns}/b/{bucket}/p/", self.create_par)
        r.add_delete("/n/{ns}/b/{bucket}/p/{par}", self.delete_par)
        r.add_get("/p/{token}/n/{ns}/b/{bucket}/o/{name:.+}", self.par_get)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        if request.path.startswith("/p/"):
            return await handler(request)
        self.calls.append((time.monotonic(), f"{request.method} {request.path}"))
        if not self._signature_ok(request):
            return _error(401, "NotAuthenticated", "The required information to complete "
                          "authentication was not provided or was incorrect.")
        if self.throttle:
            return _error(429, "TooManyRequests", "Too many requests for the tenancy",
                          headers={"Retry-After": f"{self.throttle.pop(0):g}"})
        return await handler(request)

    def _signature_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        params = dict(re.findall(r'(\w+)="([^"]*)"', header))
        key = self.keys.get(params.get("keyId", ""))
        if not header.startswith("Signature ") or key is None:
            return False
        lines = []
        for name in params.get("headers", "").split():
            if name == "(request-target)":
                lines.append(f"(request-target): {request.method.lower()} {request.path_qs}")
            elif name in request.headers:
                lines.append(f"{name}: {request.headers[name]}")
            else:
                return False
        try:
            key.verify(base64.b64decode(params.get("signature", "")), "\n".join(lines).encode(),
                       padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return False
        return True

    async def list_instances(self, request):
        found = [i for i in self.instances.values()
                 if i["compartmentId"] == request.query["compartmentId"]]
        if not self.page_size:
            return web.json_response(found)
        start = int(request.query.get("page", "0"))
        end = start + self.page_size
        headers = {"opc-next-page": str(end)} if end < len(found) else {}
        return web.json_response(found[start:end], headers=headers)

    async def get_instance(self, request):
        inst = self.instances.get(request.match_info["id"])
        return web.json_response(inst) if inst else _error(404, "NotAuthorizedOrNotFound", "no")

    async def list_boot_attachments(self, request):
        return web.json_response([a for a in self.boot_attachments
                                  if a["instanceId"] == request.query.get("instanceId")])

    async def list_volume_attachments(self, request):
        return web.json_response([a for a in self.volume_attachments
                                  if a["instanceId"] == request.query.get("instanceId")])

    async def list_vnic_attachments(self, request):
        return web.json_response([a for a in self.vnic_attachments
                                  if a["instanceId"] == request.query.get("instanceId")])

    async def get_vnic(self, request):
        return web.json_response(self.vnics[request.match_info["id"]])

    async def get_boot_volume(self, request):
        return web.json_response(self.boot_volumes[request.match_info["id"]])

    async def get_volume(self, request):
        return web.json_response(self.volumes[request.match_info["id"]])

    async def create_image(self, request):
        body = await request.json()
        inst = self.instances.get(body["instanceId"])
        if inst is None:
            return _error(404, "NotAuthorizedOrNotFound", "instance not found")
        boot = next(a["bootVolumeId"] for a in self.boot_attachments
                    if a["instanceId"] == inst["id"])
        image = {"id": ocid("image"), "displayName": body["displayName"],
                 "compartmentId": body["compartmentId"], "lifecycleState": "PROVISIONING",
                 "createImageAllowed": True, "timeCreated": "2026-01-01T00:00:00.000Z",
                 "_content": self.disk_content[boot], "_polls": 0}
        self.images[image["id"]] = image
        await self._held("create_image")
        return web.json_response(_public(image))

    async def get_image(self, request):
        if request.match_info["id"] in self.base_images:
            return web.json_response(self.base_images[request.match_info["id"]])
        image = self.images.get(request.match_info["id"])
        if image is None:
            return _error(404, "NotAuthorizedOrNotFound", "image not found")
        image["_polls"] += 1
        if image["lifecycleState"] == "EXPORTING" and self.export_hangs:
            pass
        elif image["lifecycleState"] == "PROVISIONING" and image["_polls"] >= 2:
            image["lifecycleState"] = "AVAILABLE"
        elif image["lifecycleState"] == "EXPORTING" and image["_polls"] >= 2:
            if self.export_fails:
                image["lifecycleState"] = "DISABLED"
            else:
                self.objects[image["_export_to"]] = image["_content"]
                image["lifecycleState"] = "AVAILABLE"
        return web.json_response(_public(image))

    async def export_image(self, request):
        image = self.images[request.match_info["id"]]
        body = await request.json()
        assert body["destinationType"] == "objectStorageTuple", body
        image.update(lifecycleState="EXPORTING", _polls=0,
                     _export_to=(body["bucketName"], body["objectName"]))
        return web.json_response(_public(image))

    async def delete_image(self, request):
        self.images.pop(request.match_info["id"], None)
        return web.Response(status=204)

    async def get_namespace(self, request):
        return web.json_response(self.namespace)

    async def head_object(self, request):
        content = self.objects.get((request.match_info["bucket"], request.match_info["name"]))
        if content is None:
            return web.Response(status=404)
        return web.Response(status=200, headers={"Content-Length": str(len(content)),
                                                 "ETag": "e1"})

    async def delete_object(self, request):
        self.objects.pop((request.match_info["bucket"], request.match_info["name"]), None)
        return web.Response(status=204)

    async def create_par(self, request):
        body = await request.json()
        token = secrets.token_urlsafe(24)
        bucket = request.match_info["bucket"]
        par = {"id": f"par-{next(self._seq)}", "name": body["name"],
               "accessType": body["accessType"], "objectName": body["objectName"],
               "accessUri": f"/p/{token}/n/{self.namespace}/b/{bucket}/o/{body['objectName']}",
               "timeExpires": body["timeExpires"], "timeCreated": "2026-01-01T00:00:00.000Z",
               "_token": token, "_bucket": bucket}
        self.pars[par["id"]] = par
        await self._held("create_par")
        return web.json_response(_public(par))

    async def _held(self, call: str) -> None:
        if call in self.hold_answer:
            await self.hold_answer[call].wait()

    async def delete_par(self, request):
        self.pars.pop(request.match_info["par"], None)
        return web.Response(status=204)

    async def par_get(self, request):
        par = next((p for p in self.pars.values() if p["_token"] == request.match_info["token"]),
                   None)
        if par is None or par["objectName"] != request.match_info["name"]:
            return _error(404, "NotFound", "no such pre-authenticated request")
        content = self.objects[(par["_bucket"], par["objectName"])]
        self.par_gets.append(request.headers.get("Range", ""))
        start = int(re.match(r"bytes=(\d+)-", request.headers.get("Range", "bytes=0-")).group(1))
        response = web.StreamResponse(status=206 if start else 200)
        response.content_length = len(content) - start
        if start:
            response.headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        await response.prepare(request)
        body = content[start:]
        if self.drop_after is not None:
            cut, self.drop_after = self.drop_after, None
            await response.write(body[:cut])
            request.transport.close()   # the connection drops mid-body
            return response
        await response.write(body)
        await response.write_eof()
        return response


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status,
                             headers={"opc-request-id": "req-1", **(headers or {})})

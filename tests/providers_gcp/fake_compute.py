"""`FakeComputeServer`: Compute Engine and Cloud Build REST in memory, a test double.

It answers the REST shapes google-cloud-compute sends and the Cloud Build calls the
provider makes, and stands in for Google's exporter too: when a build finishes it
writes the disk's bytes (registered by the test) into the GCS emulator's bucket.
"""
from __future__ import annotations

import asyncio
import base64
import io
import itertools
from dataclasses import dataclass, field

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

BUCKET = "exports"
PROJECT = "proj-1"


def storage_client(endpoint: str):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": endpoint})


@dataclass
class FakeComputeServer:
    """Compute Engine + Cloud Build REST, in memory. Not Google: a test double."""

    gcs_endpoint: str
    url: str = ""
    instances: dict[str, list[dict]] = field(default_factory=dict)   # zone -> instances
    machine_types: dict[str, dict] = field(default_factory=dict)
    disk_content: dict[str, bytes] = field(default_factory=dict)     # disk name -> bytes
    images: dict[str, dict] = field(default_factory=dict)
    deleted_images: list[str] = field(default_factory=list)
    force_flags: list[str | None] = field(default_factory=list)  # forceCreate per insert
    builds: dict[str, dict] = field(default_factory=dict)
    build_outcome: str = "SUCCESS"
    build_reply_gate: asyncio.Event | None = None  # set: a new build's answer waits for it
    required_token: str = ""       # when set, requests need it or a JWT from a trusted key
    trusted_key: object = None     # an RSA public key whose self-signed JWTs are accepted
    requests: list[str] = field(default_factory=list)
    paged: bool = False
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def link(self, path: str) -> str:
        return f"{self.url}/compute/v1/projects/{PROJECT}/{path}"

    def add_instance(self, zone: str, name: str, *, disks: dict[str, bytes], status="RUNNING",
                     labels=None, machine_type="e2-standard-2", uefi=False) -> None:
        attached = []
        for index, (disk_name, content) in enumerate(disks.items()):
            self.disk_content[disk_name] = content
            features = [{"type": "UEFI_COMPATIBLE"}] if uefi and index == 0 else []
            licenses = [self.link("global/licenses/debian-12-bookworm").replace(
                PROJECT, "debian-cloud")] if index == 0 else []
            attached.append({"deviceName": disk_name, "index": index, "boot": index == 0,
                             "licenses": licenses,
                             "type": "PERSISTENT", "interface": "SCSI",
                             "source": self.link(f"zones/{zone}/disks/{disk_name}"),
                             "diskSizeGb": "1", "guestOsFeatures": features})
        self.instances.setdefault(zone, []).append({
            "id": str(1000 + next(self._ids)), "name": name, "status": status,
            "machineType": self.link(f"zones/{zone}/machineTypes/{machine_type}"),
            "labels": labels or {}, "disks": attached,
            "networkInterfaces": [{"name": "nic0", "network": self.link("global/networks/default")}],
            "shieldedInstanceConfig": {"enableSecureBoot": False},
            "selfLink": self.link(f"zones/{zone}/instances/{name}"),
        })
        self.machine_types.setdefault(machine_type, {"name": machine_type, "guestCpus": 2,
                                                     "memoryMb": 8192})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        base = "/compute/v1/projects/{project}"
        app.router.add_get(base + "/aggregated/instances", self.aggregated)
        app.router.add_get(base + "/zones/{zone}/instances", self.list_zone)
        app.router.add_get(base + "/zones/{zone}/instances/{name}", self.get_instance)
        app.router.add_post(base + "/zones/{zone}/instances/{name}/{action}", self.power)
        app.router.add_get(base + "/zones/{zone}/machineTypes/{name}", self.machine_type)
        app.router.add_post(base + "/global/images", self.insert_image)
        app.router.add_delete(base + "/global/images/{name}", self.delete_image)
        app.router.add_get(base + "/global/operations/{name}", self.operation)
        app.router.add_get(base + "/zones/{zone}/operations/{name}", self.operation)
        app.router.add_post("/v1/projects/{project}/builds", self.create_build)
        app.router.add_get("/v1/projects/{project}/builds/{build_id}", self.get_build)
        app.router.add_post("/v1/projects/{project}/builds/{build_id}:cancel", self.cancel_build)
        app.router.add_post("/token", self.token)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        self.requests.append(f"{request.method} {request.path}")
        if self.required_token and request.path != "/token":
            if not self._authorized(request.headers.get("Authorization", "")):
                return web.json_response({"error": {"code": 401, "message": "Request had invalid "
                                                    "authentication credentials."}}, status=401)
        return await handler(request)

    def _authorized(self, header: str) -> bool:
        token = header.removeprefix("Bearer ")
        if token == self.required_token:
            return True
        parts = token.split(".")
        if len(parts) != 3 or self.trusted_key is None:
            return False
        pad = lambda text: base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))  # noqa: E731
        try:
            self.trusted_key.verify(pad(parts[2]), f"{parts[0]}.{parts[1]}".encode(),
                                    padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    def _find(self, zone: str, name: str) -> dict | None:
        return next((i for i in self.instances.get(zone, []) if i["name"] == name), None)

    @staticmethod
    def _not_found(what: str) -> web.Response:
        return web.json_response({"error": {"code": 404, "message": f"The resource {what} was "
                                            "not found"}}, status=404)

    def _done_operation(self, target: str) -> web.Response:
        return web.json_response({"kind": "compute#operation", "name": f"op-{next(self._ids)}",
                                  "status": "DONE", "targetLink": target, "progress": 100})

    async def aggregated(self, request):
        """One zone per page when `paged` (the pager must follow nextPageToken)."""
        zones = sorted(self.instances)
        if self.paged:
            index = int(request.query.get("pageToken") or 0)
            zones = zones[index:index + 1]
            more = {"nextPageToken": str(index + 1)} if index + 1 < len(self.instances) else {}
        else:
            more = {}
        items = {f"zones/{zone}": {"instances": self.instances[zone]} for zone in zones}
        return web.json_response({"kind": "compute#instanceAggregatedList", "items": items,
                                  **more})

    async def list_zone(self, request):
        return web.json_response({"items": self.instances.get(request.match_info["zone"], [])})

    async def get_instance(self, request):
        inst = self._find(request.match_info["zone"], request.match_info["name"])
        return web.json_response(inst) if inst else self._not_found(request.match_info["name"])

    async def power(self, request):
        inst = self._find(request.match_info["zone"], request.match_info["name"])
        if inst is None:
            return self._not_found(request.match_info["name"])
        inst["status"] = {"stop": "TERMINATED", "start": "RUNNING"}[request.match_info["action"]]
        return self._done_operation(inst["selfLink"])

    async def machine_type(self, request):
        found = self.machine_types.get(request.match_info["name"])
        return web.json_response(found) if found else self._not_found(request.match_info["name"])

    async def insert_image(self, request):
        body = await request.json()
        disk = body["sourceDisk"].rpartition("/")[2]
        if disk not in self.disk_content:
            return self._not_found(body["sourceDisk"])
        self.images[body["name"]] = {"name": body["name"], "disk": disk}
        self.force_flags.append(request.query.get("forceCreate"))
        return self._done_operation(self.link(f"global/images/{body['name']}"))

    async def delete_image(self, request):
        name = request.match_info["name"]
        if self.images.pop(name, None) is None:
            return self._not_found(name)
        self.deleted_images.append(name)
        return self._done_operation(self.link(f"global/images/{name}"))

    async def operation(self, request):
        return self._done_operation("")

    async def create_build(self, request):
        body = await request.json()
        args = dict(arg.lstrip("-").split("=", 1) for arg in body["steps"][0]["args"])
        image = args["source_image"].rpartition("/")[2]
        build_id = f"build-{next(self._ids)}"
        self.builds[build_id] = {"id": build_id, "status": "WORKING", "args": args,
                                 "polls": 0, "image": image}
        if self.build_reply_gate is not None:
            await self.build_reply_gate.wait()
        return web.json_response({"name": f"projects/{PROJECT}/operations/{build_id}",
                                  "metadata": {"build": {"id": build_id, "status": "QUEUED"}}})

    async def get_build(self, request):
        build = self.builds[request.match_info["build_id"]]
        build["polls"] += 1
        if build["status"] == "WORKING" and build["polls"] >= 2 and self.build_outcome != "HANG":
            if self.build_outcome == "SUCCESS":
                await asyncio.to_thread(self._write_export, build)
            build["status"] = self.build_outcome
            if self.build_outcome != "SUCCESS":
                build["statusDetail"] = "step exited with non-zero status: 1"
        return web.json_response({"id": build["id"], "status": build["status"],
                                  "statusDetail": build.get("statusDetail", "")})

    async def cancel_build(self, request):
        self.builds[request.match_info["build_id"]]["status"] = "CANCELLED"
        return web.json_response({})

    def _write_export(self, build: dict) -> None:
        """What the real exporter does: put the image's disk into the bucket."""
        bucket_name, _, object_name = build["args"]["destination_uri"][5:].partition("/")
        content = self.disk_content[self.images[build["image"]]["disk"]]
        blob = storage_client(self.gcs_endpoint).bucket(bucket_name).blob(object_name)
        blob.upload_from_file(io.BytesIO(content), size=len(content))

    async def token(self, request):
        return web.json_response({"access_token": self.required_token or "tok",
                                  "expires_in": 3600, "token_type": "Bearer"})

"""vSphere tags, read through the vSphere Automation REST API (`/rest`) of a vCenter.

Tags are not part of the SOAP inventory, so they cost a few more calls per
listing, independent of the number of VMs: log in, one
`list-attached-tags-on-objects` for all VMs, one GET per distinct tag and
category, log out. Tags come back as `category=tag`, like custom attributes
(`name=value`).

Tags are optional data: a server without the REST API (a plain ESXi host answers
404), a user without the permission, a proxy in the way or a service that does not
answer never fails a listing, a VM's details or an export. `SessionTags` then gives
the VMs no vSphere tags, says why once per provider session in the daemon log, puts
the reason in each VM's details (`extra["tags_unavailable"]`) and asks the endpoint
again only after `RETRY_INTERVAL`, so that a hanging service does not slow every call.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time

import aiohttp

from ..model import VMInfo
from .vsphere_session import SessionPool

log = logging.getLogger(__name__)
RETRY_INTERVAL = 600.0  # seconds before an endpoint whose tags could not be read is asked again

SESSION = "/com/vmware/cis/session"
ASSOCIATIONS = "/com/vmware/cis/tagging/tag-association?~action=list-attached-tags-on-objects"
TAG = "/com/vmware/cis/tagging/tag/id:"
CATEGORY = "/com/vmware/cis/tagging/category/id:"


class TagsUnavailable(Exception):
    """The tags could not be read (no vAPI REST service, refused, no answer): why."""


class SessionTags:
    """The vSphere tags of one provider session (see the module's docstring)."""

    def __init__(self, pool: SessionPool) -> None:
        self.pool = pool
        self.problem = ""  # why the tags could not be read the last time they were asked
        self._retry_at = -math.inf
        self._warned = False

    async def add_to(self, vms: list[VMInfo]) -> None:
        """Add each VM's vSphere tags, or mark the VMs with the reason there are none."""
        if vms and time.monotonic() >= self._retry_at:
            try:
                tags = await fetch_vm_tags(self.pool, [vm.identifier for vm in vms])
            except TagsUnavailable as exc:
                self._failed(str(exc))
            else:
                self.problem = ""
                for vm in vms:
                    vm.tags.extend(tags.get(vm.identifier, []))
        if self.problem:
            for vm in vms:
                vm.extra["tags_unavailable"] = self.problem

    def _failed(self, reason: str) -> None:
        self.problem = f"the vSphere tags could not be read ({reason})"
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        if not self._warned:
            self._warned = True
            log.warning("%s: %s; VMs are listed and exported without them (custom attributes "
                        "still show), asking again every %gs", self.pool.where, self.problem,
                        RETRY_INTERVAL)


async def _value(response: aiohttp.ClientResponse, what: str):
    if response.status >= 400:
        raise TagsUnavailable(f"{what}: HTTP {response.status} {response.reason or ''}".rstrip())
    try:
        body = await response.json(content_type=None)
    except ValueError:
        raise TagsUnavailable(f"{what}: the answer is not JSON") from None
    if not isinstance(body, dict):
        raise TagsUnavailable(f"{what}: the answer is not a vAPI result")
    return body.get("value")


async def fetch_vm_tags(pool: SessionPool, vm_ids: list[str]) -> dict[str, list[str]]:
    """VM id -> ['category=tag', ...]; TagsUnavailable saying why when they cannot be read."""
    try:
        return await _fetch(pool, vm_ids)
    except asyncio.TimeoutError:
        raise TagsUnavailable(f"{pool.base_url}/rest: no answer within {pool.timeout:g}s") from None
    except aiohttp.ClientError as exc:
        raise TagsUnavailable(f"{pool.base_url}/rest: {exc or type(exc).__name__}") from None


async def _fetch(pool: SessionPool, vm_ids: list[str]) -> dict[str, list[str]]:
    base = pool.base_url + "/rest"
    password = await asyncio.to_thread(pool.password)
    timeout = aiohttp.ClientTimeout(total=pool.timeout)
    ssl = pool.ssl_context()
    async with aiohttp.ClientSession(timeout=timeout) as http:
        token = base64.b64encode(f"{pool.username}:{password}".encode()).decode()
        login = {"Authorization": f"Basic {token}"}
        async with http.post(base + SESSION, headers=login, ssl=ssl) as response:
            headers = {"vmware-api-session-id": await _value(response, "tags login")}
        try:
            body = {"object_ids": [{"type": "VirtualMachine", "id": vm_id} for vm_id in vm_ids]}
            async with http.post(base + ASSOCIATIONS, json=body, headers=headers,
                                 ssl=ssl) as response:
                attached = await _value(response, "tag associations") or []
            names: dict[str, str] = {}
            categories: dict[str, str] = {}
            for entry in attached:
                for tag_id in entry.get("tag_ids") or []:
                    if tag_id not in names:
                        names[tag_id] = await _tag_name(http, base, tag_id, headers, ssl,
                                                        categories)
            return {entry["object_id"]["id"]: [names[t] for t in entry.get("tag_ids") or []]
                    for entry in attached}
        finally:  # a logout that fails costs a session on the server, not the tags
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.delete(base + SESSION, headers=headers, ssl=ssl):
                    pass


async def _tag_name(http: aiohttp.ClientSession, base: str, tag_id: str, headers: dict, ssl,
                    categories: dict[str, str]) -> str:
    """'category=tag' for one tag id; category names are looked up once each."""
    async with http.get(base + TAG + tag_id, headers=headers, ssl=ssl) as response:
        tag = await _value(response, "tag") or {}
    category_id = tag.get("category_id", "")
    if category_id not in categories:
        async with http.get(base + CATEGORY + category_id, headers=headers, ssl=ssl) as response:
            category = await _value(response, "tag category") or {}
        categories[category_id] = category.get("name", category_id)
    return f"{categories[category_id]}={tag.get('name', tag_id)}"

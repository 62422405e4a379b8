"""vSphere tags, read through the vSphere Automation REST API (`/rest`) of a vCenter.

Tags are not part of the SOAP inventory, so they cost a few more calls per
listing, independent of the number of VMs: log in, one
`list-attached-tags-on-objects` for all VMs, one GET per distinct tag and
category, log out. A server without the REST API (a plain ESXi host) answers
404: then there are no tags, and the endpoint is not asked again.
Tags come back as `category=tag`, like custom attributes (`name=value`).
"""
from __future__ import annotations

import asyncio
import base64

import aiohttp

from .vsphere_session import SessionPool

SESSION = "/com/vmware/cis/session"
ASSOCIATIONS = "/com/vmware/cis/tagging/tag-association?~action=list-attached-tags-on-objects"
TAG = "/com/vmware/cis/tagging/tag/id:"
CATEGORY = "/com/vmware/cis/tagging/category/id:"


class TagsUnavailable(Exception):
    """The endpoint has no vAPI REST service (or refuses it): no tags from it."""


async def _value(response: aiohttp.ClientResponse, what: str):
    if response.status in (401, 403, 404):
        raise TagsUnavailable(f"{what}: HTTP {response.status}")
    response.raise_for_status()
    return (await response.json(content_type=None)).get("value")


async def fetch_vm_tags(pool: SessionPool, vm_ids: list[str]) -> dict[str, list[str]]:
    """VM id -> ['category=tag', ...]; raises TagsUnavailable when the server has no tags API."""
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
        finally:
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

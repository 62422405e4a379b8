"""Test set-up through the simulator's vAPI REST endpoint, as a vSphere admin would do it."""
from __future__ import annotations

import base64
import http.client
import json


def vapi(sim, method: str, path: str, body=None, session: str | None = None):
    """One call to `/rest<path>`; its `value`. Fails the test on any status but 200."""
    headers = {"Content-Type": "application/json"}
    if session:
        headers["vmware-api-session-id"] = session
    else:
        token = base64.b64encode(f"{sim.username}:{sim.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    conn = http.client.HTTPConnection(sim.host, sim.port, timeout=10)
    try:
        conn.request(method, "/rest" + path, body=json.dumps(body) if body else None,
                     headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert response.status == 200, (path, response.status, data)
        return json.loads(data).get("value") if data else None
    finally:
        conn.close()


def attach_tag(sim, vm_id: str, category: str, tag: str) -> None:
    """Create tag `category=tag` (category and tag new) and attach it to VM `vm_id`."""
    session = vapi(sim, "POST", "/com/vmware/cis/session")
    category_id = vapi(sim, "POST", "/com/vmware/cis/tagging/category", {"create_spec": {
        "name": category, "description": "", "cardinality": "SINGLE",
        "associable_types": ["VirtualMachine"]}}, session)
    tag_id = vapi(sim, "POST", "/com/vmware/cis/tagging/tag", {"create_spec": {
        "name": tag, "description": "", "category_id": category_id}}, session)
    vapi(sim, "POST", f"/com/vmware/cis/tagging/tag-association/id:{tag_id}?~action=attach",
         {"object_id": {"type": "VirtualMachine", "id": vm_id}}, session)

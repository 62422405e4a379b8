"""The OpenAPI 3 document served at /openapi.json, describing exactly the routes in app.py.

tests/bridge/test_openapi.py checks that every route is documented and every
documented operation is a route; schemathesis checks the handlers against it.
"""
from __future__ import annotations

from typing import Any

from hypersdk.service import __version__

STATUSES = ["pending", "running", "completed", "failed", "cancelled"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra) -> dict:
    return {"type": kind, "nullable": True, **extra}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str) -> dict:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


ERROR = {"description": "An error (see `error` for its code)",
         "content": {"application/json": {"schema": _ref("Error")}}}


def _query(name: str, required: bool, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": required, "schema": schema,
            "description": description}


ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"},
            "description": "The object's id"}


def _op(summary: str, ok: dict, *, body: str | None = None, params: list | None = None,
        public: bool = False, tag: str = "jobs") -> dict:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag],
                                 "responses": {"200": ok, "default": ERROR}}
    if body:
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": _ref(body)}}}
    if params:
        operation["parameters"] = params
    if public:
        operation["security"] = []
    return operation


def _automation(kind: str, list_key: str, create_path: str, body: str, tag: str) -> dict:
    return {
        (create_path, "post"): _op(f"Create a {kind}", _json(_ref("AutomationObject")),
                                   body=body, tag=tag),
        (f"/{tag}", "get"): _op(f"List {kind}s", _json({
            "type": "object", "required": [list_key, "total"],
            "properties": {list_key: {"type": "array", "items": _ref("AutomationObject")},
                           "total": {"type": "integer"}}}), tag=tag),
        (f"/{tag}/{{id}}", "delete"): _op(f"Delete a {kind}", _json(_ref("Deleted")),
                                          params=[ID_PARAM], tag=tag),
    }


OPERATIONS: dict[tuple[str, str], dict] = {
    ("/health", "get"): {**_op("Is hypervisord reachable?", _json(_ref("Health")), public=True,
                               tag="service"),
                         "responses": {"200": _json(_ref("Health")),
                                       "503": _json(_ref("Health"), "hypervisord unavailable"),
                                       "default": ERROR}},
    ("/openapi.json", "get"): _op("This document", _json({"type": "object"}), public=True,
                                  tag="service"),
    ("/capabilities", "get"): _op("Providers, job kinds, export methods, formats",
                                  _json(_ref("Capabilities")), tag="service"),
    ("/metrics", "get"): _op("Prometheus metrics", _text("Prometheus text format"),
                             tag="service"),
    ("/vms/list", "post"): _op("List the VMs of a provider", _json(_ref("VmList")),
                               body="VmListRequest", tag="vms"),
    ("/vms/info", "get"): _op("One VM", _json({"type": "object"}), tag="vms", params=[
        _query("identifier", True, {"type": "string", "minLength": 1}, "id, name or path"),
        _query("provider", True, {"type": "string", "minLength": 1}, "provider name")]),
    ("/jobs/submit", "post"): _op("Submit an export job", _json(_ref("Submitted")),
                                  body="ExportRequest"),
    ("/jobs", "get"): _op("List jobs, oldest first", _json(_ref("JobList")), params=[
        _query("status", False, {"type": "string", "enum": STATUSES}, "only this status"),
        _query("provider", False, {"type": "string"}, "only this provider"),
        _query("limit", False, {"type": "integer", "minimum": 0, "maximum": 1000}, "page size"),
        _query("offset", False, {"type": "integer", "minimum": 0}, "jobs to skip")]),
    ("/jobs/query", "get"): _op("A job's state", _json(_ref("Job")), params=[
        _query("job_id", True, {"type": "string", "minLength": 1}, "the job id")]),
    ("/jobs/progress/{id}", "get"): _op("A job's progress", _json(_ref("Progress")),
                                        params=[ID_PARAM]),
    ("/jobs/eta/{id}", "get"): _op("A job's expected end", _json(_ref("Eta")), params=[ID_PARAM]),
    ("/jobs/logs/{id}", "get"): _op(
        "A job's log as text lines", _text("one line per log entry: time LEVEL message"),
        params=[ID_PARAM, _query("follow", False, {"type": "boolean"},
                                 "stay open until the job ends")]),
    ("/jobs/cancel/{id}", "post"): _op("Cancel a job", _json(_ref("CancelAnswer")),
                                       params=[ID_PARAM]),
    ("/jobs/{id}/cutover", "post"): _op(
        "Cut a warm export over: shut the VM down, copy the last delta, go on as a cold "
        "export (an error for a job that is not warm or already cut over)",
        _json(_ref("CutoverAnswer")), params=[ID_PARAM]),
    ("/jobs/retry/{id}", "post"): _op("Run a failed or cancelled job again, as a new job",
                                      _json(_ref("Submitted")), params=[ID_PARAM]),
    ("/convert", "post"): _op("Convert a disk, OVF or OVA (a job)", _json(_ref("Submitted")),
                              body="ConvertRequest", tag="kvm"),
    ("/import-to-kvm", "post"): _op("Define a libvirt domain (a job)", _json(_ref("Submitted")),
                                    body="ImportRequest", tag="kvm"),
    ("/parse-vmdk", "get"): _op("Read a VMDK's descriptor and headers", _json({"type": "object"}),
                                tag="kvm", params=[
        _query("path", True, {"type": "string", "minLength": 1}, "absolute path")]),
    ("/websocket", "get"): {
        "summary": "Live job updates (WebSocket)", "tags": ["jobs"],
        "description": "Messages are Update objects. Send {\"subscribe\": [job ids]} to "
                       "watch some jobs only, {\"type\": \"ping\"} for a pong. Browsers, "
                       "which cannot set headers here, may send the token as "
                       "?access_token= (no other route takes it); pages need an origin "
                       "in api.allowed_origins. The connection is closed (1008) when its "
                       "token is removed.",
        "responses": {"101": {"description": "Switching to the WebSocket protocol"},
                      "426": ERROR, "default": ERROR}},
    **_automation("schedule", "schedules", "/schedules/create", "ScheduleRequest", "schedules"),
    **_automation("backup policy", "backup_policies", "/backup-policies/create",
                  "BackupPolicyRequest", "backup-policies"),
    **_automation("webhook", "webhooks", "/webhooks/configure", "WebhookRequest", "webhooks"),
    ("/plans", "post"): _op("Create a migration plan", _json(_ref("AutomationObject")),
                            body="PlanRequest", tag="plans"),
    ("/plans", "get"): _op("List migration plans, oldest first", _json({
        "type": "object", "required": ["plans", "total", "limit", "offset"],
        "properties": {"plans": {"type": "array", "items": _ref("AutomationObject")},
                       "total": {"type": "integer"}, "limit": {"type": "integer"},
                       "offset": {"type": "integer"}}}), tag="plans", params=[
        _query("limit", False, {"type": "integer", "minimum": 0, "maximum": 1000},
               "at most this many (default 100)"),
        _query("offset", False, {"type": "integer", "minimum": 0}, "skip this many")]),
    ("/plans/{id}", "get"): _op("A plan with its per-VM status table",
                                _json(_ref("AutomationObject")), params=[ID_PARAM], tag="plans"),
    ("/plans/{id}/preflight", "post"): _op(
        "Check every VM of the plan (names, networks, storage, space, guest OS, credentials)",
        _json(_ref("Preflight")), params=[ID_PARAM], tag="plans"),
    ("/plans/{id}/start", "post"): _op(
        "Start the plan (refused unless its preflight passes)",
        _json(_ref("PlanStarted")),
        params=[ID_PARAM], tag="plans"),
    ("/plans/{id}/cancel", "post"): _op(
        "Cancel the plan: no more VMs are released, running jobs are cancelled",
        _json(_ref("PlanCancelled")),
        params=[ID_PARAM], tag="plans"),
    ("/plans/{id}/cutover", "post"): _op(
        "Cut a warm plan over: its VMs in pre-copy now, those released later after their "
        "first round", _json(_ref("PlanCutover")), params=[ID_PARAM], tag="plans"),
    ("/plans/{id}/report", "get"): _op(
        "What moved, how long, verified or not, errors (final once the plan ended)",
        _json(_ref("PlanReport")),
        params=[ID_PARAM], tag="plans"),
}

_STR, _INT, _NUM, _BOOL, _OBJ = ({"type": "string"}, {"type": "integer"}, {"type": "number"},
                                 {"type": "boolean"}, {"type": "object"})
_DATE = {"type": "string", "format": "date-time"}


def _object(required: list[str], properties: dict, additional: bool = False) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": additional}
    if required:  # OpenAPI 3.0 refuses an empty list
        schema["required"] = required
    return schema


# true, or how to tell the guest booted: text on its serial console within a timeout
_VERIFY_BOOT = {"oneOf": [_BOOL, _object([], {"timeout": _STR, "expect": _STR})]}
# warm migration (jobs/warm.py): pre-copy rounds until cutover
_WARM = {"warm": _BOOL, "precopy_interval": {"type": "integer", "minimum": 1},
         "cutover_at": {"type": "string", "format": "date-time"}}
_INTEGRATION = _object([], {"enabled": _BOOL, "auto_convert": _BOOL, "daemon_mode": _BOOL,
                            "instance": _STR, "guest_conversion": _BOOL,
                            "verify_boot": _VERIFY_BOOT, "target": _STR}, True)
SCHEMAS: dict[str, dict] = {
    "Error": _object(["error", "message", "field"], {
        "error": _STR, "message": _STR, "field": _nullable("string")}),
    "Health": _object(["status", "version"], {
        "status": {"type": "string", "enum": ["healthy", "unhealthy"]}, "version": _STR,
        "reason": _STR}),
    "Capabilities": {"type": "object", "required": ["version"], "properties": {
        "version": _STR, "providers": {"type": "array", "items": _OBJ},
        "job_kinds": {"type": "array", "items": _STR},
        "export_methods": {"type": "array", "items": _STR},
        "output_formats": {"type": "array", "items": _STR},
        "features": {"type": "array", "items": _STR}}},
    "VmListRequest": _object(["provider"], {"provider": {"type": "string", "minLength": 1},
                                            "filter": _OBJ}),
    "VmList": _object(["provider", "vms", "total"], {
        "provider": _STR, "vms": {"type": "array", "items": _OBJ}, "total": _INT}),
    "ExportRequest": _object(["vm_identifier", "provider"], {
        "vm_identifier": _STR, "provider": _STR, "export_method": _STR, "export_path": _STR,
        "options": _OBJ, "hyper2kvm_integration": _INTEGRATION,
        **_WARM}, True),
    "ConvertRequest": _object(["source_path", "output_path"], {
        "source_path": _STR, "output_path": _STR, "conversion_options": _OBJ,
        "target": _STR}, True),
    "ImportRequest": _object(["vm_name", "disk_path"], {
        "vm_name": _STR, "disk_path": _STR, "memory_mb": _INT, "vcpus": _INT,
        "network": _STR, "autostart": _BOOL, "guest_conversion": _BOOL,
        "verify_boot": _VERIFY_BOOT, "target": _STR}, True),
    "ScheduleRequest": _object(["name", "cron", "job_definition"], {
        "name": _STR, "cron": _STR, "job_definition": _OBJ}, True),
    "BackupPolicyRequest": _object(["name"], {
        "name": _STR, "vm_filter": _OBJ, "schedule": _STR, "retention": _OBJ,
        "export_options": _OBJ}, True),
    "WebhookRequest": _object(["url", "events"], {
        "url": _STR, "events": {"type": "array", "items": _STR},
        "headers": {"type": "object", "additionalProperties": _STR}}, True),
    "Submitted": _object(["job_id", "status", "created_at"], {
        "job_id": _STR, "status": {"type": "string", "enum": ["pending"]},
        "created_at": _DATE}),
    "Job": _object(["job_id", "status", "progress", "created_at"], {
        "job_id": _STR, "status": {"type": "string", "enum": STATUSES}, "operation": _STR,
        "vm": _STR, "provider": _STR, "stage": _STR,
        "progress": {"type": "number", "minimum": 0, "maximum": 100},
        "bytes_done": _INT, "bytes_total": _INT, "rate": _INT, "eta": _nullable("number"),
        "created_at": _nullable("string", format="date-time"),
        "started_at": _nullable("string", format="date-time"),
        "ended_at": _nullable("string", format="date-time"), "error": _STR,
        "attempts": _INT, "retry_of": _nullable("string"),
        "requested_by": _nullable("string"), "instance": _nullable("string"),
        "definition": _OBJ, "result": _OBJ}),
    "JobList": _object(["jobs", "total", "limit", "offset"], {
        "jobs": {"type": "array", "items": _ref("Job")}, "total": _INT, "limit": _INT,
        "offset": _INT}),
    "Progress": _object(["job_id", "status", "percentage", "bytes_done", "bytes_total"], {
        "job_id": _STR, "status": _STR, "stage": _STR,
        "percentage": {"type": "number", "minimum": 0, "maximum": 100},
        "progress_valid": _BOOL, "bytes_done": _INT, "bytes_total": _INT, "rate": _INT,
        "eta": _nullable("number")}),
    "Eta": _object(["job_id", "status", "eta_seconds"], {
        "job_id": _STR, "status": _STR, "eta_seconds": _nullable("number"),
        "expected_end_time": _nullable("string", format="date-time"), "rate": _INT,
        "percentage": _NUM}),
    "CutoverAnswer": _object(["job_id", "cutover_requested"], {
        "job_id": _STR, "cutover_requested": _BOOL}),
    "CancelAnswer": _object(["job_id", "status", "cancel_requested"], {
        "job_id": _STR, "status": _STR, "cancel_requested": _BOOL}),
    "AutomationObject": {"type": "object", "required": ["id"], "properties": {"id": _STR}},
    "Deleted": _object(["id", "deleted"], {"id": _STR, "deleted": _BOOL}),
    "PlanRequest": _object(["name", "provider", "storage_map"], {
        "name": _STR, "provider": _STR, "vms": {"type": "array", "items": _STR},
        "filter": _OBJ, "network_map": _OBJ, "storage_map": _OBJ, "limits": _object([], {
            "per_plan": _INT, "per_host": _INT, "per_datastore": _INT}),
        "verify_boot": _VERIFY_BOOT, "guest_conversion": _BOOL, "description": _STR,
        **_WARM}, True),
    "PlanStarted": _object(["id", "start_requested"], {"id": _STR, "start_requested": _BOOL}),
    "PlanCutover": _object(["id", "cutover_jobs"], {
        "id": _STR, "cutover_jobs": {"type": "array", "items": _STR}}),
    "PlanCancelled": _object(["id", "cancel_requested"], {"id": _STR,
                                                          "cancel_requested": _BOOL}),
    "PlanReport": {"type": "object", "required": ["id", "status", "final", "vms"]},
    "Preflight": {"type": "object", "required": ["ok", "vms"],
                  "properties": {"ok": _BOOL, "at": _NUM, "problem": _STR,
                                 "vms": {"type": "array", "items": _OBJ}}},
    "Update": _object(["type", "job_id", "status", "progress"], {
        "type": {"type": "string", "enum": ["job.created", "job.status", "job.progress",
                                            "job.completed"]},
        "job_id": _STR, "status": _STR, "progress": _NUM, "stage": _STR, "bytes_done": _INT,
        "bytes_total": _INT, "rate": _INT, "eta": _nullable("number"), "error": _STR,
        "time": _NUM}),
}


def document() -> dict:
    paths: dict[str, dict] = {}
    for (path, method), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "hypersdk REST API", "version": __version__,
                 "description": "The REST and WebSocket face of hypervisord (a D-Bus client)."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }

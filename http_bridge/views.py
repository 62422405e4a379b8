"""The JSON shapes the REST API and the WebSocket answer with, built from mirrored properties."""
from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from hypersdk.client.names import FINISHED
_SECRET_KEY_RE = re.compile(r"secret|password|token|authorization|credential", re.IGNORECASE)


def rfc3339(usec: int) -> str | None:
    """µs since the epoch (0 = unknown) -> '2026-01-29T10:00:00Z' or None."""
    if not usec:
        return None
    moment = datetime.fromtimestamp(usec / 1_000_000, tz=timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_property(text: str) -> Any:
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def percentage(props: dict) -> float:
    if props.get("Status") == "completed":
        return 100.0
    if not props.get("ProgressValid"):
        return 0.0
    return round(float(props.get("Progress", 0.0)) * 100, 2)


def eta_seconds(props: dict) -> float | None:
    """Seconds left, from ExpectedEndTime; None while there is no estimate."""
    expected = props.get("ExpectedEndTime", 0)
    if not expected or props.get("Status") in FINISHED:
        return None
    return round(max(0.0, expected / 1_000_000 - time.time()), 1)


def progress_json(props: dict) -> dict:
    return {
        "job_id": props.get("Id", ""),
        "status": props.get("Status", ""),
        "stage": props.get("Stage", ""),
        "percentage": percentage(props),
        "progress_valid": bool(props.get("ProgressValid", False)),
        "bytes_done": int(props.get("BytesDone", 0)),
        "bytes_total": int(props.get("BytesTotal", 0)),
        "rate": int(props.get("Rate", 0)),
        "eta": eta_seconds(props),
    }


def eta_json(props: dict) -> dict:
    return {
        "job_id": props.get("Id", ""),
        "status": props.get("Status", ""),
        "eta_seconds": eta_seconds(props),
        "expected_end_time": rfc3339(props.get("ExpectedEndTime", 0))
        if props.get("Status") not in FINISHED else None,
        "rate": int(props.get("Rate", 0)),
        "percentage": percentage(props),
    }


def job_json(props: dict) -> dict:
    return {
        "job_id": props.get("Id", ""),
        "status": props.get("Status", ""),
        "operation": props.get("Operation", ""),
        "vm": props.get("VM", ""),
        "provider": props.get("Provider", ""),
        "stage": props.get("Stage", ""),
        "progress": percentage(props),
        "bytes_done": int(props.get("BytesDone", 0)),
        "bytes_total": int(props.get("BytesTotal", 0)),
        "rate": int(props.get("Rate", 0)),
        "eta": eta_seconds(props),
        "created_at": rfc3339(props.get("CreatedTime", 0)),
        "started_at": rfc3339(props.get("StartTime", 0)),
        "ended_at": rfc3339(props.get("EndTime", 0)),
        "error": props.get("Error", ""),
        "attempts": int(props.get("Attempts", 0)),
        "retry_of": props.get("RetryOf", "") or None,
        # who asked: "rest:<token name>" or "unix:<user>" (hypervisord's RequestedBy);
        # None for jobs from before principals were recorded
        "requested_by": props.get("RequestedBy", "") or None,
        # the hypervisord that runs or ran it (daemon.instance); None while pending
        "instance": props.get("Instance", "") or None,
        "definition": _json_property(props.get("Definition", "")),
        "result": _json_property(props.get("Result", "")),
    }


def update_json(props: dict, event: str) -> dict:
    """A WebSocket message: the spec's {job_id, status, progress} plus details."""
    return {
        "type": event,
        "job_id": props.get("Id", ""),
        "status": props.get("Status", ""),
        "progress": percentage(props),
        "stage": props.get("Stage", ""),
        "bytes_done": int(props.get("BytesDone", 0)),
        "bytes_total": int(props.get("BytesTotal", 0)),
        "rate": int(props.get("Rate", 0)),
        "eta": eta_seconds(props),
        "error": props.get("Error", ""),
        "time": time.time(),
    }


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def redact(value: Any) -> Any:
    """Hide values under keys that look secret (webhook headers, passwords) in answers."""
    if isinstance(value, dict):
        return {k: "<redacted>" if isinstance(v, str) and v and _SECRET_KEY_RE.search(str(k))
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def object_json(path: str, props: dict) -> dict:
    """A schedule, backup policy or webhook object: its properties in snake_case.

    Properties holding JSON documents (strings starting with { or [) are parsed.
    """
    body: dict[str, Any] = {"id": props.get("Id") or path.rsplit("/", 1)[-1]}
    for name, value in props.items():
        if isinstance(value, str) and value[:1] in ("{", "["):
            value = _json_property(value)
        body[_snake(name)] = value
    body["id"] = body.get("id") or path.rsplit("/", 1)[-1]
    return redact(body)

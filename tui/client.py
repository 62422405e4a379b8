"""The console's view of hypervisord, built on the shared client (hypersdk.client).

`ServiceObjects` keeps the connection and the mirror of the service's objects in
arrival order; this module turns its events into the console's view (jobs as
`JobState`, the Manager's version, counts and capabilities, the automation objects)
and `ClientEvent`s for screens. There is no polling loop.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from hypersdk.client.names import (FINISHED, JOB_IFACE, JOBS_PATH, MANAGER_IFACE, MANAGER_PATH,
                                   job_id_from_path, job_path)
from hypersdk.client.objects import Listeners, ObjectEvent, ServiceObjects

LOG_PAGE = 1000  # GetJobLog's maximum page
RECENT_JOBS = 500  # stored jobs listed besides those on the bus


@dataclass
class LogLine:
    id: int
    time_usec: int
    level: str
    message: str

    def format(self) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.time_usec / 1e6))
        return f"{stamp} {self.level:<7} {self.message}"


@dataclass
class JobState:
    """One job as last announced by the service (property name -> plain value)."""

    path: str
    props: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.props.get(name, default)

    @property
    def order(self) -> tuple[int, str]:
        """Oldest first, as submitted."""
        return self.props.get("CreatedTime", 0), self.id

    @property
    def id(self) -> str:
        return self.props.get("Id") or self.path.rsplit("/", 1)[-1].replace("_", "-")

    @property
    def status(self) -> str:
        return self.props.get("Status", "")

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def progress(self) -> float | None:
        """0..1, or None when the service has no valid estimate."""
        if self.status == "completed":
            return 1.0
        return float(self.props.get("Progress", 0.0)) if self.props.get("ProgressValid") else None

    def eta_seconds(self, now: float) -> float | None:
        expected = int(self.props.get("ExpectedEndTime", 0))
        if not expected or self.finished:
            return None
        return max(0.0, expected / 1e6 - now)

    def to_dict(self) -> dict:
        """The job as a JSON-ready document (for `--json`)."""
        props = self.props

        def load(name: str) -> Any:
            try:
                return json.loads(props.get(name) or "{}")
            except json.JSONDecodeError:
                return props.get(name)

        return {
            "id": self.id, "path": self.path, "operation": props.get("Operation", ""),
            "status": self.status, "stage": props.get("Stage", ""),
            "progress": self.progress, "bytes_done": props.get("BytesDone", 0),
            "bytes_total": props.get("BytesTotal", 0), "rate": props.get("Rate", 0),
            "created_time": props.get("CreatedTime", 0), "start_time": props.get("StartTime", 0),
            "end_time": props.get("EndTime", 0),
            "expected_end_time": props.get("ExpectedEndTime", 0),
            "error": props.get("Error", ""), "vm": props.get("VM", ""),
            "provider": props.get("Provider", ""), "attempts": props.get("Attempts", 0),
            "started_by_uid": props.get("StartedByUID"), "retry_of": props.get("RetryOf", ""),
            "definition": load("Definition"), "result": load("Result"),
        }


@dataclass
class Mirror:
    """What the client knows about the service; also what a console renders."""

    service_up: bool = False
    version: str = ""
    capabilities: dict = field(default_factory=dict)
    job_counts: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, JobState] = field(default_factory=dict)
    # Other objects (schedules, backup policies, webhooks): path -> interface -> props.
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def objects_under(self, prefix: str) -> dict[str, dict[str, dict[str, Any]]]:
        return {path: ifaces for path, ifaces in sorted(self.objects.items())
                if path.startswith(prefix + "/")}

    def providers(self) -> list[dict]:
        return list(self.capabilities.get("providers", []))


@dataclass
class ClientEvent:
    """type: service (up/down changed), manager, job, job-removed, log, completed, objects."""

    type: str
    job_id: str = ""
    line: LogLine | None = None
    success: bool = False
    message: str = ""



class HyperClient:
    """The service seen from the console. `await connect()` once, or `await run()` to stay up."""

    def __init__(self, bus: str = "system") -> None:
        self.service = ServiceObjects(bus)
        self.mirror = Mirror()
        self._listeners: Listeners[ClientEvent] = Listeners()
        self.subscribe = self._listeners.subscribe
        self._emit = self._listeners.emit
        self.service.subscribe(self._on_object_event)

    # -- connection --------------------------------------------------------------------
    @property
    def bus_spec(self) -> str:
        return self.service.bus_spec

    @property
    def connected(self) -> bool:
        return self.service.connected

    async def connect(self) -> None:
        """Connect and load the view; ClientError if the bus is unreachable or refuses us.

        If hypervisord is not running the connection still succeeds with the view
        marked down; it fills in when the service appears.
        """
        await self.service.connect()

    async def run(self) -> None:
        """Stay connected until `close()`: reconnect with backoff whenever the bus drops."""
        await self.service.run()

    def close(self) -> None:
        self.service.close()

    # -- the view, from the shared mirror's events -----------------------------------------
    def _on_object_event(self, event: ObjectEvent) -> None:
        if event.type == "health":
            self._on_health()
        elif event.type in ("added", "changed"):
            self._take(event.path, event.interface)
        elif event.type == "removed":
            self._drop(event.path, event.interface)
        elif event.type == "log":
            self._emit(ClientEvent("log", job_id_from_path(event.path),
                                   line=LogLine(*event.args)))
        elif event.type == "completed":
            success, message = event.args
            self._emit(ClientEvent("completed", job_id_from_path(event.path),
                                   success=bool(success), message=str(message)))

    def _on_health(self) -> None:
        mirror = self.mirror
        if not self.service.healthy:
            if mirror.service_up:
                mirror.service_up = False
                self._emit(ClientEvent("service"))
            return
        mirror.jobs.clear()
        mirror.objects.clear()
        for path, interfaces in self.service.objects.items():
            for interface in interfaces:
                self._take(path, interface, announce=False)
        mirror.service_up = True
        for kind in ("manager", "service", "objects"):
            self._emit(ClientEvent(kind))

    def _take(self, path: str, interface: str, announce: bool = True) -> None:
        """Take in one object's interface as the shared mirror now holds it."""
        props = self.service.get(path, interface)
        if props is None:
            return
        mirror = self.mirror
        if interface == JOB_IFACE:
            job = JobState(path, props)  # the mirror's own dict: changes land in it
            mirror.jobs[job.id] = job
            event = ClientEvent("job", job.id)
        elif interface == MANAGER_IFACE:
            mirror.version = props.get("Version", "")
            mirror.job_counts = dict(props.get("JobCounts", {}))
            try:
                mirror.capabilities = json.loads(props.get("Capabilities") or "{}")
            except json.JSONDecodeError:
                mirror.capabilities = {}
            event = ClientEvent("manager")
        elif interface.startswith("org.hypersdk."):
            mirror.objects.setdefault(path, {})[interface] = props
            event = ClientEvent("objects")
        else:
            return
        if announce:
            self._emit(event)

    def _drop(self, path: str, interface: str) -> None:
        if interface == JOB_IFACE and path.startswith(JOBS_PATH + "/"):
            job_id = job_id_from_path(path)
            if self.mirror.jobs.pop(job_id, None) is not None:
                self._emit(ClientEvent("job-removed", job_id))
        elif self.mirror.objects.get(path, {}).pop(interface, None) is not None:
            if not self.mirror.objects[path]:
                del self.mirror.objects[path]
            self._emit(ClientEvent("objects"))

    # -- calls -------------------------------------------------------------------------
    async def call_manager(self, member: str, signature: str, *args: Any) -> Any:
        body = await self.service.call(MANAGER_PATH, MANAGER_IFACE, member,
                                       signature + "a{sv}", [*args, {}])
        return body[0] if body else None

    async def call_object(self, path: str, interface: str, member: str, signature: str = "",
                          *args: Any) -> Any:
        """Call a method of a schedule/policy/webhook object (they end with options a{sv})."""
        body = await self.service.call(path, interface, member, signature + "a{sv}",
                                       [*args, {}])
        return body[0] if body else None

    async def list_vms(self, provider: str, vm_filter: dict | None = None) -> list[dict]:
        text = await self.call_manager("ListVMs", "ss", provider, json.dumps(vm_filter or {}))
        return json.loads(text)

    async def submit(self, definition: dict, kind: str = "export") -> str:
        """Submit a job; returns its id."""
        (path,) = await self.service.call(MANAGER_PATH, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                                          [json.dumps(definition), {"kind": Variant("s", kind)}])
        return job_id_from_path(path)

    # -- jobs by id, through the Manager: on the bus or not (daemon.finished_job_linger) -------
    async def cancel(self, job_id: str) -> None:
        await self.call_manager("CancelJob", "s", job_id)

    async def retry(self, job_id: str) -> str:
        """Submit a finished job's definition again; the new job's id."""
        return job_id_from_path(await self.call_manager("RetryJob", "s", job_id))

    async def get_log(self, job_id: str, after_id: int = 0) -> list[LogLine]:
        """Every line after `after_id`, read in GetJobLog's pages (at most LOG_PAGE each)."""
        lines: list[LogLine] = []
        while True:
            (page,) = await self.service.call(
                MANAGER_PATH, MANAGER_IFACE, "GetJobLog", "sta{sv}",
                [job_id, after_id, {"limit": Variant("u", LOG_PAGE)}])
            lines += [LogLine(*line) for line in page]
            if len(page) < LOG_PAGE:
                return lines
            after_id = lines[-1].id

    async def recent_jobs(self, count: int = RECENT_JOBS) -> dict[str, JobState]:
        """The newest `count` stored jobs, on the bus or not (JobCounts says how many)."""
        stored = sum(self.mirror.job_counts.values())
        options = {"limit": Variant("u", count), "offset": Variant("t", max(0, stored - count))}
        records, _total = await self.service.call(MANAGER_PATH, MANAGER_IFACE, "ListJobRecords",
                                                  "a{sv}", [options])
        return {job.id: job for job in map(_stored_state, records)}

    async def stored_job(self, job_id: str) -> JobState:
        """The job's record in the store (for a job that has left the bus)."""
        return _stored_state(await self.call_manager("GetJob", "s", job_id))

    async def find_job(self, identifier: str) -> JobState:
        """The job as the bus shows it, else as it is stored; ClientError if unknown."""
        job_id = job_id_from_path(identifier) if identifier.startswith("/") else identifier
        if job_id in self.mirror.jobs:
            return self.mirror.jobs[job_id]
        return await self.stored_job(job_id)

    async def follow_log(self, job_id: str, follow: bool = True) -> AsyncIterator[LogLine]:
        """The job's log so far, then (with follow) new lines until the job ends."""
        queue: asyncio.Queue[ClientEvent] = asyncio.Queue()

        def on_event(event: ClientEvent) -> None:
            if event.job_id == job_id and event.type in ("log", "completed"):
                queue.put_nowait(event)
            elif event.type == "service" and not self.mirror.service_up:
                queue.put_nowait(event)

        unsubscribe = self.subscribe(on_event)
        try:
            last = 0
            for line in await self.get_log(job_id):
                last = line.id
                yield line
            job = self.mirror.jobs.get(job_id)  # not on the bus: finished and stored
            if not follow or job is None or job.finished:
                return
            while True:
                event = await queue.get()
                if event.type == "log" and event.line.id > last:
                    last = event.line.id
                    yield event.line
                elif event.type in ("completed", "service"):
                    break
            if self.mirror.service_up:
                for line in await self.get_log(job_id, last):
                    yield line
        finally:
            unsubscribe()


def _stored_state(record: dict[str, Any]) -> JobState:
    """A job record (the Job interface's property names) as the view's JobState."""
    props = {name: getattr(value, "value", value) for name, value in record.items()}
    return JobState(job_path(props["Id"]), props)

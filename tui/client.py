"""A D-Bus client of hypervisord: a mirror of its objects kept current by signals.

The mirror is filled once from the ObjectManager (GetManagedObjects) and then kept
in step by InterfacesAdded/Removed and PropertiesChanged; log lines and completions
arrive as LogLine and Completed signals. There is no polling loop. When hypervisord
leaves the bus (NameOwnerChanged to "") the mirror is marked down and reloaded when
it returns; when the bus connection itself drops, `run()` reconnects with backoff.

Listeners get `ClientEvent`s; the console and the CLI are both built on this.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Message, MessageType, Variant, unpack_variants
from dbus_fast.aio import MessageBus

from hypersdk.service.dbus.bus import connect
from hypersdk.service.dbus.paths import BUS_NAME, JOBS_PATH, MANAGER_PATH, ROOT_PATH, job_path

log = logging.getLogger(__name__)

MANAGER_IFACE = "org.hypersdk.HyperSDK1.Manager"
JOB_IFACE = "org.hypersdk.HyperSDK1.Job"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER_IFACE = "org.freedesktop.DBus.ObjectManager"
ERROR_PREFIX = "org.hypersdk.HyperSDK1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
LOG_PAGE = 1000  # GetLog's maximum page
CALL_TIMEOUT = 120.0
BACKOFF_START = 0.5
BACKOFF_MAX = 10.0


class ClientError(Exception):
    """A failure a person can read: `name` is the short D-Bus error name."""

    def __init__(self, message: str, name: str = "Failed") -> None:
        super().__init__(message)
        self.message = message
        self.name = name

    @property
    def access_denied(self) -> bool:
        return self.name == "AccessDenied"

    @property
    def unavailable(self) -> bool:
        return self.name in ("ServiceUnknown", "NoConnection")

    def __str__(self) -> str:
        return self.message


def error_from_reply(reply: Message) -> ClientError:
    """An ERROR reply -> ClientError with a human message."""
    error_name = reply.error_name or ""
    text = str(reply.body[0]) if reply.body else error_name
    if error_name == ACCESS_DENIED and text.startswith("Rejected send message"):
        # the bus itself refused (data/dbus-1/system.d): not a polkit answer
        return ClientError("permission denied: only root and members of group hypersdk may "
                           "talk to hypervisord (ask an administrator to add you to the "
                           "group)", "AccessDenied")
    if error_name == ACCESS_DENIED:
        return ClientError(f"permission denied: {text}", "AccessDenied")
    if error_name.startswith(ERROR_PREFIX):
        return ClientError(text, error_name[len(ERROR_PREFIX):])
    if error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                      "org.freedesktop.DBus.Error.NameHasNoOwner"):
        return ClientError("hypervisord is not running (nobody owns " + BUS_NAME + ")",
                           "ServiceUnknown")
    if error_name == "org.freedesktop.DBus.Error.UnknownObject":
        return ClientError(text, "NotFound")
    return ClientError(f"{error_name}: {text}", error_name.rsplit(".", 1)[-1])


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

    def sorted_jobs(self) -> list[JobState]:
        return sorted(self.jobs.values(), key=lambda job: (job.get("CreatedTime", 0), job.id))

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


Listener = Callable[[ClientEvent], None]


def _match_rules() -> list[str]:
    return [
        f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT_PATH}'",
        "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
        f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
    ]


class HyperClient:
    """The service seen from a client. `await connect()` once, or `await run()` to stay up."""

    def __init__(self, bus: str = "system") -> None:
        self.bus_spec = bus
        self.mirror = Mirror()
        self._bus: MessageBus | None = None
        self._listeners: list[Listener] = []
        self._reload_task: asyncio.Task | None = None
        self._snapshot_serial = 0  # the pending GetManagedObjects call, if any
        self._closing = False

    # -- listeners ---------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, event: ClientEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken listener must not stop the others
                log.exception("client listener failed")

    # -- connection --------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._bus is not None and self._bus.connected

    async def connect(self) -> None:
        """Connect to the bus and load the mirror; ClientError if the bus is unreachable.

        If hypervisord is not running the connection still succeeds with the mirror
        marked down; it fills in when the service appears.
        """
        try:
            bus = await connect(self.bus_spec)
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot connect to the {self.bus_spec} bus: {exc}",
                              "NoConnection") from None
        self._bus = bus
        try:
            bus.add_message_handler(self._on_message)
            for rule in _match_rules():
                await self._call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                 "org.freedesktop.DBus", "AddMatch", "s", [rule])
            await self.reload()
        except ClientError:
            self._bus = None  # half set up: `run()` must start over, not wait on it
            bus.disconnect()
            raise

    async def run(self) -> None:
        """Stay connected until `close()`: reconnect with backoff whenever the bus drops."""
        delay = BACKOFF_START
        while not self._closing:
            try:
                if not self.connected:
                    await self.connect()
                delay = BACKOFF_START
                await self._bus.wait_for_disconnect()
            except ClientError as exc:
                log.debug("connect failed: %s", exc)
            except Exception as exc:  # a dropped connection surfaces in many shapes
                log.debug("bus connection lost: %s", exc)
            if self._closing:
                break
            self._bus = None
            self._set_down()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    def close(self) -> None:
        self._closing = True
        if self._reload_task:
            self._reload_task.cancel()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def reload(self) -> None:
        """Replace the mirror with the service's current objects (or mark it down).

        The reply is applied by the message handler, in arrival order, before this call
        returns: a signal sent after the snapshot (a job the restarted service has just
        failed) lands on it instead of being overwritten by it.
        """
        serial = self._bus.next_serial() if self._bus is not None else 0
        self._snapshot_serial = serial
        try:
            await self._call(BUS_NAME, ROOT_PATH, OBJECT_MANAGER_IFACE,
                             "GetManagedObjects", "", [], serial=serial)
        except ClientError as exc:
            if exc.unavailable:
                self._set_down()
                return
            raise
        finally:
            if self._snapshot_serial == serial:  # not applied (an error); not a newer call's
                self._snapshot_serial = 0

    def _apply_snapshot(self, objects: dict) -> None:
        mirror = self.mirror
        mirror.jobs.clear()
        mirror.objects.clear()
        for path, interfaces in unpack_variants(objects).items():
            self._add_object(path, interfaces, announce=False)
        mirror.service_up = True
        self._emit(ClientEvent("manager"))
        self._emit(ClientEvent("service"))
        self._emit(ClientEvent("objects"))

    def _set_down(self) -> None:
        if self.mirror.service_up:
            self.mirror.service_up = False
            self._emit(ClientEvent("service"))

    def _add_object(self, path: str, interfaces: dict[str, dict[str, Any]],
                    announce: bool = True) -> None:
        """Take in one object's interfaces; `announce=False` while reloading everything."""
        mirror = self.mirror
        emit = self._emit if announce else (lambda event: None)
        if JOB_IFACE in interfaces:
            job = JobState(path, dict(interfaces[JOB_IFACE]))
            mirror.jobs[job.id] = job
            emit(ClientEvent("job", job.id))
        elif MANAGER_IFACE in interfaces:
            props = interfaces[MANAGER_IFACE]  # all of them, or only the changed ones
            mirror.version = props.get("Version", mirror.version)
            mirror.job_counts = dict(props.get("JobCounts", mirror.job_counts))
            if "Capabilities" in props:
                try:
                    mirror.capabilities = json.loads(props["Capabilities"] or "{}")
                except json.JSONDecodeError:
                    mirror.capabilities = {}
            emit(ClientEvent("manager"))
        else:
            own = {name: dict(values) for name, values in interfaces.items()
                   if name.startswith("org.hypersdk.")}
            if own:
                mirror.objects.setdefault(path, {}).update(own)
                emit(ClientEvent("objects"))

    # -- signals -----------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        try:
            if msg.message_type == MessageType.SIGNAL:
                self._on_signal(msg)
            elif (msg.message_type == MessageType.METHOD_RETURN and self._snapshot_serial
                  and msg.reply_serial == self._snapshot_serial):
                self._snapshot_serial = 0
                self._apply_snapshot(msg.body[0])
        except Exception:
            log.exception("could not handle %s.%s from %s", msg.interface, msg.member, msg.path)

    def _on_signal(self, msg: Message) -> None:
        member, path = msg.member, msg.path or ""
        if member == "NameOwnerChanged" and msg.body and msg.body[0] == BUS_NAME:
            if msg.body[2]:
                self._schedule_reload()
            else:
                self._set_down()
            return
        if not path.startswith(ROOT_PATH):
            return
        if member == "PropertiesChanged" and msg.interface == PROPERTIES_IFACE:
            self._properties_changed(path, msg.body[0], unpack_variants(msg.body[1]))
        elif member == "InterfacesAdded":
            self._add_object(msg.body[0], unpack_variants(msg.body[1]))
        elif member == "InterfacesRemoved":
            self._remove_object(msg.body[0])
        elif member == "LogLine" and msg.interface == JOB_IFACE:
            line = LogLine(*msg.body)
            self._emit(ClientEvent("log", _job_id(path), line=line))
        elif member == "Completed" and msg.interface == JOB_IFACE:
            self._emit(ClientEvent("completed", _job_id(path), success=bool(msg.body[0]),
                                   message=str(msg.body[1])))

    def _properties_changed(self, path: str, interface: str, changed: dict) -> None:
        mirror = self.mirror
        if interface == JOB_IFACE:
            job = mirror.jobs.get(_job_id(path))
            if job is not None:
                job.props.update(changed)
                self._emit(ClientEvent("job", job.id))
        elif interface == MANAGER_IFACE:
            self._add_object(path, {MANAGER_IFACE: changed})
        elif path in mirror.objects and interface in mirror.objects[path]:
            mirror.objects[path][interface].update(changed)
            self._emit(ClientEvent("objects"))

    def _remove_object(self, path: str) -> None:
        job_id = _job_id(path)
        if path.startswith(JOBS_PATH + "/") and self.mirror.jobs.pop(job_id, None):
            self._emit(ClientEvent("job-removed", job_id))
        elif self.mirror.objects.pop(path, None) is not None:
            self._emit(ClientEvent("objects"))

    def _schedule_reload(self) -> None:
        """hypervisord (re)appeared: reload, retrying with backoff while it starts up."""
        if self._reload_task and not self._reload_task.done():
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_with_backoff())

    async def _reload_with_backoff(self) -> None:
        delay = BACKOFF_START
        while not self._closing and self.connected:
            try:
                await self.reload()
                if self.mirror.service_up:
                    return
            except ClientError as exc:
                log.debug("reload failed: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    # -- calls -------------------------------------------------------------------------
    async def _call(self, destination: str, path: str, interface: str, member: str,
                    signature: str, body: list, timeout: float = CALL_TIMEOUT,
                    serial: int = 0) -> list:
        """`serial`: one from the bus's next_serial(), to recognise the reply (0: any)."""
        if self._bus is None:
            raise ClientError("not connected to the bus", "NoConnection")
        message = Message(destination=destination, path=path, interface=interface,
                          member=member, signature=signature, body=body, serial=serial)
        try:
            reply = await asyncio.wait_for(self._bus.call(message), timeout)
        except asyncio.TimeoutError:
            raise ClientError(f"{member}: no answer from {destination} within {timeout:.0f} s",
                              "Timeout") from None
        except (OSError, EOFError) as exc:
            raise ClientError(f"the bus connection was lost ({exc})", "NoConnection") from None
        if reply is None:
            raise ClientError("the bus connection was lost", "NoConnection")
        if reply.message_type == MessageType.ERROR:
            raise error_from_reply(reply)
        return reply.body

    async def call_manager(self, member: str, signature: str, *args: Any) -> Any:
        body = await self._call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, member,
                                signature + "a{sv}", [*args, {}])
        return body[0] if body else None

    async def call_object(self, path: str, interface: str, member: str, signature: str = "",
                          *args: Any) -> Any:
        """Call a method of a schedule/policy/webhook object (they end with options a{sv})."""
        body = await self._call(BUS_NAME, path, interface, member, signature + "a{sv}",
                                [*args, {}])
        return body[0] if body else None

    async def list_vms(self, provider: str, vm_filter: dict | None = None) -> list[dict]:
        text = await self.call_manager("ListVMs", "ss", provider, json.dumps(vm_filter or {}))
        return json.loads(text)

    async def submit(self, definition: dict, kind: str = "export") -> str:
        """Submit a job; returns its id."""
        path = (await self._call(BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "SubmitJob", "sa{sv}",
                                 [json.dumps(definition), {"kind": Variant("s", kind)}]))[0]
        return _job_id(path)

    async def cancel(self, job_id: str) -> None:
        await self._call(BUS_NAME, job_path(job_id), JOB_IFACE, "Cancel", "a{sv}", [{}])

    async def retry(self, job_id: str) -> str:
        path = (await self._call(BUS_NAME, job_path(job_id), JOB_IFACE, "Retry", "a{sv}",
                                 [{}]))[0]
        return _job_id(path)

    async def get_log(self, job_id: str, after_id: int = 0) -> list[LogLine]:
        """Every line after `after_id`, read in GetLog's pages (at most LOG_PAGE each)."""
        lines: list[LogLine] = []
        while True:
            page = (await self._call(BUS_NAME, job_path(job_id), JOB_IFACE, "GetLog",
                                     "ta{sv}", [after_id, {"limit": Variant("u", LOG_PAGE)}]))[0]
            lines += [LogLine(*line) for line in page]
            if len(page) < LOG_PAGE:
                return lines
            after_id = lines[-1].id

    def job(self, identifier: str) -> JobState:
        """A job of the mirror by id ("job-1a2b") or object path; ClientError if unknown."""
        job_id = _job_id(identifier) if identifier.startswith("/") else identifier
        job = self.mirror.jobs.get(job_id)
        if job is None:
            raise ClientError(f"job {identifier!r} not found", "NotFound")
        return job

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
            if not follow or self.job(job_id).finished:
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


def _job_id(path: str) -> str:
    return path.rsplit("/", 1)[-1].replace("_", "-")

"""Migration plans: a preflight of every VM, then one export job per VM released under
the plan's limits, a per-VM status table and a report (plan_definition.py says what a
plan is).

- `preflight` asks the provider (credentials, the VMs) and libvirt (names, networks)
  and looks at the target directories (there, enough space for the VM's disks counted
  over the whole plan) before anything moves; each VM gets every rule's verdict.
- `start` runs the preflight again and refuses to start a plan it fails. The VM list is
  then fixed (a row per VM in the store) and each VM's job is an export job of the
  Direct Pipeline (`export_method: disk`, converted into its storage_map directory,
  defined in libvirt with its NICs on the mapped networks and bridges, MACs kept).
- A VM is released (its job submitted) only while the plan's jobs not yet ended stay
  within `per_plan`, and those of its source host and datastore within `per_host` and
  `per_datastore`. The engine's workers and export slots still apply on top.
- A job interrupted by a stop or crash of hypervisord puts its VM back in the queue
  (plan jobs never shut the source VM down, so running it again is safe); at start the
  plans that were running carry on releasing their VMs.
- Cancel cancels the jobs running and releases no more. At the end the report (what
  moved, how long, verified or not, errors) is written as JSON into a root-only
  directory beside the store.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import shutil
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from .definitions import new_id
from .disks.ovf_writer import safe_name
from .engine import JobEvent
from .errors import AlreadyExists, Failed, HyperSDKError, InvalidArgument, NotFound
from .kvm.domain_xml import guest_family
from .kvm.libvirt_import import connect
from .kvm.targets import PoolState, check_names_free, find_target, read_pool, volume_name
from .plan_definition import ANY_DATASTORE, validate_plan

if TYPE_CHECKING:
    from .config import Config
    from .engine import JobEngine
    from .model import VMInfo
    from .store import JobRecord, Store

T = TypeVar("T")

log = logging.getLogger(__name__)
ENDED = ("completed", "failed", "cancelled")
REPORT_DIR = "plan-reports"
_DATASTORE_RE = re.compile(r"^\[([^\]]+)\]")
_PLAN_COLUMNS = ("id, name, definition, status, created_by_uid, requested_by, created_at,"
                 " started_at, finished_at, preflight, report_path, instance")
_VM_COLUMNS = ("position", "vm", "name", "host", "datastore", "state", "job_id", "error",
               "started_at", "finished_at", "outcome")


@dataclass
class Plan:
    id: str
    name: str
    definition: dict
    status: str
    created_by_uid: int
    requested_by: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    preflight: dict | None
    report_path: str
    instance: str  # the hypervisord that releases its VMs (fleet.py: taken over if it dies)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "status": self.status,
                "provider": self.definition["provider"], "definition": self.definition,
                "created_at": self.created_at, "started_at": self.started_at,
                "finished_at": self.finished_at, "requested_by": self.requested_by,
                "report_path": self.report_path}


@dataclass
class PlanVM:
    position: int
    vm: str
    name: str
    host: str
    datastore: str
    state: str  # waiting | released | completed | failed | cancelled
    job_id: str
    error: str
    started_at: float | None
    finished_at: float | None
    outcome: dict

    def to_dict(self) -> dict:
        seconds = (self.finished_at - self.started_at
                   if self.started_at and self.finished_at else None)
        return {"vm": self.vm, "name": self.name, "host": self.host,
                "datastore": self.datastore, "state": self.state, "job_id": self.job_id,
                "error": self.error, "started_at": self.started_at,
                "finished_at": self.finished_at, "seconds": seconds, **self.outcome}


def _plan_from_row(row: Any) -> Plan:
    """A plan from the columns of _PLAN_COLUMNS."""
    return Plan(row[0], row[1], json.loads(row[2]), row[3], row[4], row[5], row[6], row[7],
                row[8], json.loads(row[9]) if row[9] else None, row[10], row[11])


def datastore_of(location: str) -> str:
    """`[LocalDS_0] vm/vm.vmdk` -> `LocalDS_0`; "" where the source names none."""
    match = _DATASTORE_RE.match(location)
    return match.group(1) if match else ""


def storage_target(storage_map: dict, datastore: str) -> dict | None:
    return storage_map.get(datastore) or storage_map.get(ANY_DATASTORE)


def _check(rule: str, problem: str = "") -> dict:
    return {"rule": rule, "ok": not problem, "message": problem}


def _entry(vm: str, name: str, checks: list[dict]) -> dict:
    return {"vm": vm, "name": name, "ok": all(c["ok"] for c in checks), "checks": checks}


@dataclass
class _Libvirt:
    """What preflight knows of a libvirt VMs land in (the local one or a target's), read
    once per preflight; `names`: those the plan's VMs take there."""

    uri: str
    domains: set[str]
    networks: set[str]
    problem: str = ""
    names: set[str] = field(default_factory=set)
    pools: dict[str, PoolState | HyperSDKError] = field(default_factory=dict)  # by name


def _read_libvirt(uri: str) -> _Libvirt:
    try:
        conn = connect(uri)
    except HyperSDKError as exc:
        return _Libvirt(uri, set(), set(), f"libvirt at {uri}: {exc.message}")
    try:
        return _Libvirt(uri, {d.name() for d in conn.listAllDomains()},
                        set(conn.listNetworks()) | set(conn.listDefinedNetworks()))
    finally:
        conn.close()


class _Space:
    """Free bytes per file system, less what earlier VMs of the plan will take there."""

    def __init__(self) -> None:
        self.left: dict[int | str, int] = {}  # by device, or by "<uri> <pool>"

    def take(self, needs: dict[str, int]) -> str:
        """Take `needs` (directory -> bytes) or nothing: what does not fit, or ""."""
        wanted: dict[int, int] = {}
        for directory, nbytes in needs.items():
            device = os.stat(directory).st_dev
            self.left.setdefault(device, shutil.disk_usage(directory).free)
            wanted[device] = wanted.get(device, 0) + nbytes
        for directory, nbytes in needs.items():
            device = os.stat(directory).st_dev
            if wanted[device] > self.left[device]:
                return (f"{directory} has {self.left[device]} bytes free for this VM (after "
                        f"the VMs before it in the plan); it needs {wanted[device]} there")
        for device, nbytes in wanted.items():
            self.left[device] -= nbytes
        return ""

    def take_in_pool(self, pool: str, available: int, nbytes: int) -> str:
        """Take `nbytes` in storage pool `pool` (which has `available`), or say why not."""
        self.left.setdefault(pool, available)
        if nbytes > self.left[pool]:
            return (f"pool {pool} has {self.left[pool]} bytes available for this VM (after "
                    f"the VMs before it in the plan); it needs {nbytes}")
        self.left[pool] -= nbytes
        return ""


def _one_at_a_time(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Plans change one at a time: the engine's events reach them in tasks of their own
    (JobEngine.notify), and two jobs of a plan ending together must not both release
    its next VM."""
    @functools.wraps(method)
    async def serialised(self: "Plans", *args: Any, **kwargs: Any) -> T:
        async with self._serial:
            return await method(self, *args, **kwargs)
    return serialised


class Plans:
    """The plans in the store, and the releasing of their VMs as the engine's jobs end.
    `on_change(plan_id)` callbacks hear every change (the D-Bus objects)."""

    def __init__(self, store: "Store", engine: "JobEngine", config: "Config") -> None:
        self.store = store
        self.engine = engine
        self.config = config
        self.on_change: list[Callable[[str], None]] = []
        self._serial = asyncio.Lock()
        self._cut_over: set[str] = set()  # plans whose Cutover was called (warm: cutover)
        engine.subscribe(self._on_job_event)

    # -- records ---------------------------------------------------------------------
    async def create(self, definition: Any, uid: int, requested_by: str = "") -> Plan:
        data = validate_plan(definition, self.config, self.engine.providers)
        plan_id = new_id("plan")
        async with self.store.transaction() as db:
            if (await db.execute("SELECT 1 FROM plans WHERE name=?", (data["name"],))).fetchone():
                raise AlreadyExists(f"name: a plan named {data['name']!r} exists")
            await db.execute("INSERT INTO plans (id, name, definition, status, created_by_uid,"
                             " requested_by, created_at) VALUES (?,?,?,?,?,?,?)",
                             (plan_id, data["name"], json.dumps(data), "created", uid, requested_by,
                        time.time()))
        log.info("plan %s (%s) created", plan_id, data["name"])
        return await self.get(plan_id)

    async def get(self, plan_id: str) -> Plan:
        row = (await self.store.execute(f"SELECT {_PLAN_COLUMNS} FROM plans WHERE id=?",
                                        (plan_id,))).fetchone()
        if row is None:
            raise NotFound(f"plan: no plan {plan_id!r}")
        return _plan_from_row(row)

    async def list(self) -> list[Plan]:
        return [_plan_from_row(row) for row in await self.store.execute(
            f"SELECT {_PLAN_COLUMNS} FROM plans ORDER BY created_at, id")]

    async def vms(self, plan_id: str) -> list[PlanVM]:
        rows = await self.store.execute(f"SELECT {', '.join(_VM_COLUMNS)} FROM plan_vms "
                                        "WHERE plan_id=? ORDER BY position", (plan_id,))
        return [PlanVM(*row[:10], json.loads(row[10])) for row in rows]

    async def status_table(self, plan_id: str) -> list[dict]:
        """One line per VM; a released VM's line carries its job's status now."""
        table = []
        for vm in await self.vms(plan_id):
            line = vm.to_dict()
            if vm.state == "released":
                line.update(await self._job_now(vm.job_id))
            table.append(line)
        return table

    async def _job_now(self, job_id: str) -> dict:
        try:
            job = await self.engine.get(job_id)
        except NotFound:  # gone with the store's retention (resume() records that)
            return {"job_status": "unknown"}
        return {"job_status": job.status, "stage": job.stage}

    async def _set_plan(self, plan: Plan, **values: Any) -> None:
        for key, value in values.items():
            setattr(plan, key, value)
        stored = {k: json.dumps(v) if k == "preflight" else v for k, v in values.items()}
        await self.store.execute(f"UPDATE plans SET {', '.join(f'{k}=?' for k in stored)}"
                                 " WHERE id=?", (*stored.values(), plan.id))

    async def _set_vm(self, plan_id: str, vm: str, **values: Any) -> None:
        stored = {k: json.dumps(v) if k == "outcome" else v for k, v in values.items()}
        await self.store.execute(f"UPDATE plan_vms SET {', '.join(f'{k}=?' for k in stored)} "
                                 "WHERE plan_id=? AND vm=?", (*stored.values(), plan_id, vm))

    def _changed(self, plan_id: str) -> None:
        for callback in self.on_change:
            try:
                callback(plan_id)
            except Exception:  # a broken listener must not stop a plan
                log.exception("plan listener failed for %s", plan_id)

    # -- preflight -------------------------------------------------------------------
    async def preflight(self, plan_id: str) -> dict:
        """Every VM's verdict on every rule; recorded as the plan's last preflight."""
        return (await self._preflight(await self.get(plan_id)))[0]

    async def _preflight(self, plan: Plan) -> tuple[dict, list["VMInfo"]]:
        found, entries = await self._discover(plan)
        space, views = _Space(), {}
        for vm in found:
            uri = self._landing_uri(plan, vm)
            if uri not in views:
                views[uri] = await asyncio.to_thread(_read_libvirt, uri)
            checks = await asyncio.to_thread(self._vm_checks, plan, vm, views[uri], space)
            entries.append(_entry(vm.identifier, vm.name, checks))
        report = {"ok": bool(entries) and all(e["ok"] for e in entries), "at": time.time(),
                  "vms": entries}
        if not entries:
            report["problem"] = "the plan's filter matches no VM"
        await self._set_plan(plan, preflight=report)
        self._changed(plan.id)
        return report, found

    async def _discover(self, plan: Plan) -> tuple[list["VMInfo"], list[dict]]:
        """The plan's VMs at the provider, and entries for those that failed to be found
        (a listed VM that is not there; every VM when the provider refuses us)."""
        definition = plan.definition
        wanted = definition["vms"] or ["(filter)"]
        try:
            provider = await self.engine.providers.get(definition["provider"])
            if definition["vms"] is None:
                return await provider.list_vms(definition["filter"]), []
            found, missing = [], []
            for identifier in definition["vms"]:
                try:
                    found.append(await provider.get_vm(identifier))
                except NotFound as exc:
                    missing.append(_entry(identifier, "", [_check("found", exc.message)]))
            return found, missing
        except InvalidArgument:
            raise  # the filter: the message names filter.<key>
        except HyperSDKError as exc:
            problem = f"provider {definition['provider']!r}: {exc.message}"
            return [], [_entry(vm, "", [_check("credentials", problem)]) for vm in wanted]

    def _landing(self, plan: Plan, vm: "VMInfo") -> dict | None:
        """The storage_map entry of the VM's first disk's datastore (None: unmapped)."""
        first = datastore_of(vm.disks[0].location) if vm.disks else ""
        return storage_target(plan.definition["storage_map"], first)

    def _landing_uri(self, plan: Plan, vm: "VMInfo") -> str:
        """The libvirt the VM's domain goes to: its storage target's, else the local one."""
        entry = self._landing(plan, vm) or {}
        if "target" in entry:
            return find_target(self.config, entry["target"], "storage_map").uri
        return self.config.libvirt.uri

    def _vm_checks(self, plan: Plan, vm: "VMInfo", libvirt: _Libvirt,
                   space: _Space) -> list[dict]:
        return [_check("found"), _check("credentials"),
                _check("name_free", self._name_problem(vm, libvirt)),
                _check("networks", self._network_problem(plan, vm, libvirt)),
                *self._storage_checks(plan, vm, libvirt, space),
                _check("guest_os", self._guest_problem(vm))]

    def _name_problem(self, vm: "VMInfo", libvirt: _Libvirt) -> str:
        if libvirt.problem:
            return libvirt.problem
        if vm.name in libvirt.domains:
            return f"a domain named {vm.name!r} exists at {libvirt.uri}"
        if vm.name in libvirt.names:
            return f"another VM of this plan is named {vm.name!r} too"
        libvirt.names.add(vm.name)
        return ""

    def _network_problem(self, plan: Plan, vm: "VMInfo", libvirt: _Libvirt) -> str:
        """Every NIC mapped; a mapped libvirt network defined there; a mapped bridge on
        this host (a target's host bridges are not visible from here: not checked)."""
        network_map = plan.definition["network_map"]
        local = libvirt.uri == self.config.libvirt.uri
        for nic in vm.nics:
            mapped = network_map.get(nic.network)
            if mapped is None:
                return f"NIC {nic.mac or nic.key} is on {nic.network!r}, which network_map " \
                       "does not map"
            if "network" in mapped and not libvirt.problem \
                    and mapped["network"] not in libvirt.networks:
                return (f"libvirt network {mapped['network']!r} (for {nic.network!r}) does "
                        f"not exist at {libvirt.uri}")
            if "bridge" in mapped and local and not os.path.isdir(
                    f"/sys/class/net/{mapped['bridge']}/bridge"):
                return f"host bridge {mapped['bridge']!r} (for {nic.network!r}) does not exist"
        return libvirt.problem if vm.nics else ""

    def _storage_checks(self, plan: Plan, vm: "VMInfo", libvirt: _Libvirt,
                        space: _Space) -> list[dict]:
        """storage (every disk's datastore mapped, the directory there), then space (only
        when there is a directory to count in)."""
        storage_map = plan.definition["storage_map"]
        if not vm.disks:
            return [_check("storage", "the VM has no disk to migrate")]
        for disk in vm.disks:
            datastore = datastore_of(disk.location)
            if storage_target(storage_map, datastore) is None:
                return [_check("storage", f"disk {disk.label!r} is on datastore "
                               f"{datastore or '(none named)'!r}, which storage_map does not "
                               "map")]
        nbytes = sum(d.capacity_bytes for d in vm.disks)
        entry = self._landing(plan, vm)
        if "target" in entry:
            return self._pool_checks(vm, entry, nbytes, libvirt, space)
        directory = entry["directory"]
        if not os.path.isdir(directory):
            return [_check("storage", f"target directory {directory} does not exist")]
        # the converted disks, and the exported ones the job keeps in export.base_path
        # (the first export creates export.base_path: until then, count where it will be)
        return [_check("storage"), _check("space", space.take(
            {directory: nbytes, _existing(Path(self.config.export.base_path)): nbytes}))]

    def _pool_checks(self, vm: "VMInfo", entry: dict, nbytes: int, libvirt: _Libvirt,
                     space: _Space) -> list[dict]:
        """storage (the target's pool usable, the VM's volume names free), then space in
        the pool and for the export's copy here. The pool is read once per preflight."""
        target = find_target(self.config, entry["target"], "storage_map")
        if target.pool not in libvirt.pools:
            try:
                libvirt.pools[target.pool] = read_pool(target)
            except HyperSDKError as exc:
                libvirt.pools[target.pool] = exc
        pool = libvirt.pools[target.pool]
        names = [volume_name(vm.name, f"disk{index}", target.format)
                 for index in range(len(vm.disks))]
        if isinstance(pool, HyperSDKError):
            return [_check("storage", pool.message)]
        try:
            check_names_free(target, pool.volumes, names)
        except AlreadyExists as exc:
            return [_check("storage", exc.message)]
        problem = space.take_in_pool(f"{target.pool!r} of target {target.name!r}",
                                     pool.available, nbytes)
        return [_check("storage"), _check("space", problem or space.take(
            {_existing(Path(self.config.export.base_path)): nbytes}))]

    def _guest_problem(self, vm: "VMInfo") -> str:
        family = guest_family(vm.guest_os)
        if family == "unknown":
            return (f"guest OS {vm.guest_os or '(not reported)'!r} is not one guest "
                    "conversion supports (Linux or Windows)")
        if family == "windows" and not self.config.guest_conversion.virtio_win:
            return "a Windows guest needs guest_conversion.virtio_win in the config"
        return ""

    # -- running ---------------------------------------------------------------------
    @_one_at_a_time
    async def start(self, plan_id: str) -> Plan:
        plan = await self.get(plan_id)
        if plan.status != "created":
            raise InvalidArgument("plan", f"plan {plan_id} has already {plan.status}")
        report, found = await self._preflight(plan)
        plan = await self.get(plan_id)
        if plan.status != "created":  # started by another caller meanwhile
            raise InvalidArgument("plan", f"plan {plan_id} has already {plan.status}")
        if not report["ok"]:
            failed = [f"{e['name'] or e['vm']}: {c['rule']}: {c['message']}"
                      for e in report["vms"] for c in e["checks"] if not c["ok"]]
            raise Failed("preflight failed, nothing was started: "
                         + "; ".join(failed or [report.get("problem", "")]))
        async with self.store.transaction() as db:
            for position, vm in enumerate(found):
                await db.execute("INSERT INTO plan_vms (plan_id, position, vm, name, host,"
                                 " datastore, state) VALUES (?,?,?,?,?,?,?)",
                                 (plan_id, position, vm.identifier, vm.name,
                                  vm.extra.get("host", ""), datastore_of(vm.disks[0].location),
                                  "waiting"))
        await self._set_plan(plan, status="running", started_at=time.time(),
                             instance=self.engine.instance)
        log.info("plan %s started: %d VMs", plan_id, len(found))
        await self._release(plan)
        self._changed(plan_id)
        return plan

    @_one_at_a_time
    async def cancel(self, plan_id: str) -> Plan:
        plan = await self.get(plan_id)
        if plan.status in ENDED:
            raise InvalidArgument("plan", f"plan {plan_id} has already {plan.status}")
        await self._set_plan(plan, status="cancelled")
        for vm in await self.vms(plan_id):
            if vm.state == "waiting":
                await self._set_vm(plan_id, vm.vm, state="cancelled",
                                   error="the plan was cancelled")
        for vm in await self.vms(plan_id):
            if vm.state == "released":
                try:
                    await self.engine.cancel(vm.job_id)
                except InvalidArgument:  # it ended meanwhile; its event says how
                    pass
        await self._finish_if_done(plan)
        self._changed(plan_id)
        return plan

    @_one_at_a_time
    async def resume(self) -> None:
        """At start: carry on with the plans this instance was driving."""
        for plan in await self.list():
            if plan.instance == self.engine.instance:
                await self._carry_on(plan)

    @_one_at_a_time
    async def take_over(self, dead: str) -> None:
        """Drive the unfinished plans of instance `dead`, which stopped answering
        (fleet.py); one instance wins each plan."""
        taken = (await self.store.execute(
            "UPDATE plans SET instance=? WHERE instance=? AND finished_at IS NULL AND status"
            " IN ('running', 'cancelled') RETURNING id", (self.engine.instance, dead))).fetchall()
        for (plan_id,) in taken:
            log.warning("plan %s: instance %s stopped answering; %s carries it on", plan_id,
                        dead, self.engine.instance)
            await self._carry_on(await self.get(plan_id))
            self._changed(plan_id)

    async def _carry_on(self, plan: Plan) -> None:
        """Catch up with the plan's jobs that ended unheard, and release what it may
        release now."""
        if plan.status not in ("running", "cancelled") or plan.finished_at:
            return
        for vm in await self.vms(plan.id):
            if vm.state == "released":
                try:
                    await self._job_ended(plan, vm, await self.engine.get(vm.job_id))
                except NotFound:
                    await self._set_vm(plan.id, vm.vm, state="failed",
                                       error=f"its job {vm.job_id} is no longer stored")
        if plan.status == "running":
            await self._release(plan)
        await self._finish_if_done(plan)

    async def _release(self, plan: Plan) -> None:
        vms = await self.vms(plan.id)
        active = [vm for vm in vms if vm.state == "released"]
        for vm in vms:
            if vm.state != "waiting" or not _fits(vm, active, plan.definition["limits"]):
                continue
            try:
                job = await self.engine.submit("export", self._job_definition(plan, vm),
                                               plan.created_by_uid, requested_by=plan.requested_by)
            except Failed:
                return  # hypervisord is stopping: the VM waits for the next start
            except HyperSDKError as exc:
                await self._set_vm(plan.id, vm.vm, state="failed", error=exc.message,
                                   finished_at=time.time())
                continue
            vm.state, vm.job_id = "released", job.id
            await self._set_vm(plan.id, vm.vm, state="released", job_id=job.id, error="")
            active.append(vm)
            log.info("plan %s: released %s as job %s", plan.id, vm.name, job.id)

    def _job_definition(self, plan: Plan, vm: PlanVM) -> dict:
        definition = plan.definition
        landing = storage_target(definition["storage_map"], vm.datastore)
        place = ({"target": landing["target"]} if "target" in landing
                 else {"output_dir": landing["directory"]})
        return {"vm_identifier": vm.vm, "provider": definition["provider"],
                "export_method": "disk",
                "export_path": f"plans/{plan.id}/{safe_name(vm.name)}-{vm.position}",
                "hyper2kvm_integration": {
                    "enabled": True, "auto_convert": True, "import_to_kvm": True,
                    "format": landing["format"], **place,
                    "network_map": definition["network_map"],
                    "guest_conversion": definition["guest_conversion"],
                    "verify_boot": definition["verify_boot"]},
                **self._warm_fields(plan)}

    def _warm_fields(self, plan: Plan) -> dict:
        """A warm plan's export fields; after the plan's Cutover a VM released later cuts
        over after its first round."""
        definition = plan.definition
        if not definition.get("warm"):
            return {}
        cutover_at = definition["cutover_at"]
        if plan.id in self._cut_over:
            cutover_at = datetime.now(timezone.utc).isoformat()
        return {"warm": True, "precopy_interval": definition["precopy_interval"],
                **({"cutover_at": cutover_at} if cutover_at else {})}

    async def cutover(self, plan_id: str) -> list[str]:
        """Cut over every warm VM of the plan: those in pre-copy now, those released later
        after their first round (until hypervisord restarts). The jobs cut over."""
        plan = await self.get(plan_id)
        if not plan.definition.get("warm"):
            raise InvalidArgument("plan", f"plan {plan_id} is not a warm migration"
                                  + (f" ({plan.definition['warm_fallback']})"
                                     if plan.definition.get("warm_fallback") else ""))
        if plan.status != "running":
            raise InvalidArgument("plan", f"plan {plan_id} is {plan.status}, not running")
        if plan_id in self._cut_over:
            raise InvalidArgument("plan", f"plan {plan_id} is already cut over")
        self._cut_over.add(plan_id)
        jobs = []
        for vm in await self.vms(plan_id):
            if vm.state == "released":
                try:
                    await self.engine.cutover(vm.job_id)
                    jobs.append(vm.job_id)
                except InvalidArgument as exc:  # pending, or ended meanwhile
                    log.info("plan %s: %s: %s", plan_id, vm.name, exc.message)
        log.info("plan %s: cutover of %d running job(s)", plan_id, len(jobs))
        return jobs

    def _on_job_event(self, event: JobEvent) -> Awaitable[None] | None:
        """A VM follows its job and the job's retries (RetryJob, export.resume_on_start,
        a recovery by another instance); only the instance driving the plan acts."""
        if event.type not in ("created", "status"):
            return None
        return self._job_changed(event.job)

    @_one_at_a_time
    async def _job_changed(self, job: "JobRecord") -> None:
        row = (await self.store.execute(
            "SELECT plan_id, vm, job_id FROM plan_vms WHERE state IN ('waiting', 'released')"
            " AND job_id IN (?, ?)", (job.id, job.retry_of or job.id))).fetchone()
        if row is None:
            return
        plan = await self.get(row[0])
        if plan.instance != self.engine.instance:
            self._changed(plan.id)  # another instance drives it; its table here follows
            return
        vm = next(v for v in await self.vms(plan.id) if v.vm == row[1])
        if row[2] != job.id:
            await self._follow(plan, vm, job)
        await self._job_ended(plan, vm, job)
        if plan.status == "running":
            await self._release(plan)
        await self._finish_if_done(plan)
        self._changed(plan.id)

    async def _follow(self, plan: Plan, vm: PlanVM, retry: "JobRecord") -> None:
        """The VM's job now is `retry`, made from its last one (which was interrupted:
        only a waiting or released VM is followed)."""
        vm.state, vm.job_id = "released", retry.id
        await self._set_vm(plan.id, vm.vm, state="released", job_id=retry.id,
                           outcome=_interrupted(vm, retry.retry_of or ""))
        log.info("plan %s: %s follows job %s, a retry of %s", plan.id, vm.name, retry.id,
                 retry.retry_of)

    async def _job_ended(self, plan: Plan, vm: PlanVM, job: "JobRecord") -> None:
        """Record how `vm`'s job ended. An interrupted one (hypervisord stopped) is
        followed to its retry when something runs it again, else puts the VM back in
        the queue of a running plan (its job id kept, so that a retry made later is
        still recognised)."""
        if job.status not in ENDED or vm.state != "released" or vm.job_id != job.id:
            return
        if job.status == "failed" and job.error.startswith("interrupted") \
                and plan.status == "running":
            retry = await self.store.newest_retry(job.id)
            if retry is not None:
                await self._follow(plan, vm, retry)
                await self._job_ended(plan, vm, retry)
                return
            vm.state = "waiting"
            await self._set_vm(plan.id, vm.vm, state="waiting", outcome=_interrupted(vm, job.id))
            log.info("plan %s: %s's job %s was interrupted; it waits to be released again",
                     plan.id, vm.name, job.id)
            return
        await self._set_vm(plan.id, vm.vm, state=job.status, error=job.error,
                           started_at=job.started_at, finished_at=job.finished_at,
                           outcome={**vm.outcome, **_outcome(job)})

    async def _finish_if_done(self, plan: Plan) -> None:
        vms = await self.vms(plan.id)
        if plan.finished_at or plan.status not in ("running", "cancelled") \
                or any(vm.state in ("waiting", "released") for vm in vms):
            return
        status = plan.status if plan.status == "cancelled" else (
            "completed" if all(vm.state == "completed" for vm in vms) else "failed")
        await self._set_plan(plan, status=status, finished_at=time.time())
        try:
            await self._set_plan(plan, report_path=str(await self._write_report(plan)))
        except OSError as exc:
            log.error("plan %s: could not write its report: %s", plan.id, exc)
        log.info("plan %s %s", plan.id, status)

    # -- the report ------------------------------------------------------------------
    async def report(self, plan_id: str) -> dict:
        plan = await self.get(plan_id)
        vms = [vm.to_dict() for vm in await self.vms(plan_id)]
        counts: dict[str, int] = {}
        for vm in vms:
            counts[vm["state"]] = counts.get(vm["state"], 0) + 1
        seconds = (plan.finished_at - plan.started_at
                   if plan.started_at and plan.finished_at else None)
        warnings = [plan.definition["warm_fallback"]] if plan.definition.get("warm_fallback") \
            else []
        return {**plan.to_dict(), "final": plan.finished_at is not None, "seconds": seconds,
                "warnings": warnings,
                "limits": plan.definition["limits"], "counts": counts,
                "moved": counts.get("completed", 0),
                "verified": sum(1 for vm in vms if vm.get("verified")), "vms": vms}

    async def _write_report(self, plan: Plan) -> Path:
        """The report as JSON in <database dir>/plan-reports/ (0700 root), created anew."""
        directory = Path(self.config.database.path).parent / REPORT_DIR
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / f"{plan.id}.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(await self.report(plan.id), handle, indent=2)
        return path


def _existing(path: Path) -> str:
    """`path`, or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def _interrupted(vm: PlanVM, job_id: str) -> dict:
    """`vm`'s outcome, its `interrupted_jobs` listing `job_id` (once)."""
    earlier = vm.outcome.get("interrupted_jobs", [])
    vm.outcome = {**vm.outcome, "interrupted_jobs": earlier + [job_id] * (job_id not in earlier)}
    return vm.outcome


def _fits(vm: PlanVM, active: list[PlanVM], limits: dict) -> bool:
    """Whether releasing `vm` keeps the plan, its host and its datastore within limits
    (a VM whose source names no host or datastore is limited by the plan only)."""
    if len(active) >= limits["per_plan"]:
        return False
    for key, limit in (("host", limits["per_host"]), ("datastore", limits["per_datastore"])):
        value = getattr(vm, key)
        if limit and value and sum(getattr(a, key) == value for a in active) >= limit:
            return False
    return True


def _outcome(job: "JobRecord") -> dict:
    """What a VM's report line says of its job's result: the domain, disks, verified."""
    handoff = (job.result or {}).get("hyper2kvm") or {}
    imported = handoff.get("import") or {}
    verification = imported.get("verification")
    disks = handoff.get("disks") or handoff.get("volumes") or []  # a directory's, a target's
    warm = {key: job.result[key] for key in ("downtime_seconds", "rounds")
            if key in (job.result or {})}
    return {**warm, "domain": imported.get("domain", ""), "uuid": imported.get("uuid", ""),
            "target": handoff.get("target", ""), "disks": [d.get("path") for d in disks],
            "verified": bool(verification and verification.get("verified")),
            "verification": verification or "not requested"}

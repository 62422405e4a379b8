"""hyperctl: with no arguments the console; with a subcommand a scripting CLI.

Exit codes: 0 success; 1 the job or the request failed (or was cancelled);
2 bad usage or input; 69 the bus or hypervisord cannot be reached; 77 polkit refused;
129 the console's terminal went away (as if ended by SIGHUP).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import TextIO

from hypersdk.client.errors import ClientError
from hypersdk.client.names import JOB_STATUSES, PLAN_IFACE, PLANS_PATH, plan_path

from . import format as fmt
from .client import ClientEvent, HyperClient, JobState

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_NOPERM = 77


class UsageError(Exception):
    """Bad input from the command line or a file; exits with EXIT_USAGE."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hyperctl", description="Console and scripting CLI for hypervisord.",
        epilog="Without a command, opens the full-screen console. Exit codes: 0 ok, "
               "1 failed, 2 usage, 69 service unreachable, 77 not authorized.")
    parser.add_argument("--bus", default="system",
                        help="system (default), session, or a D-Bus address")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    vms = commands.add_parser("vms", help="list the VMs of the configured providers")
    vms.add_argument("--provider", help="only this provider (default: all configured)")
    vms.add_argument("--json", action="store_true", help="print a JSON array")

    submit = commands.add_parser("submit", help="submit a job from a JSON definition")
    submit.add_argument("file", metavar="FILE.json|-", help="the definition, '-' for stdin")
    submit.add_argument("--kind", default="export", help="job kind (default: export)")
    submit.add_argument("--json", action="store_true", help="print {\"job_id\": ...}")
    submit.add_argument("--watch", action="store_true",
                        help="then watch the job; the exit code is the job's")

    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--status", choices=JOB_STATUSES, help="only jobs with this status")
    jobs.add_argument("--json", action="store_true", help="print a JSON array")

    watch = commands.add_parser("watch", help="show a job's progress until it ends")
    watch.add_argument("job", help="job id (job-...) or object path")

    logs = commands.add_parser("logs", help="print a job's log")
    logs.add_argument("job", help="job id (job-...) or object path")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")

    cancel = commands.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job", help="job id (job-...) or object path")

    cutover = commands.add_parser("cutover", help="cut a warm export over: shut the VM down, "
                                                  "copy the last delta, go on")
    cutover.add_argument("job", help="job id (job-...) or object path")
    _plan_parser(commands)
    return parser


def _plan_parser(commands) -> None:
    plan = commands.add_parser("plan", help="migration plans: create, preflight, start, ...")
    actions = plan.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a plan from a JSON definition")
    create.add_argument("file", metavar="FILE.json|-", help="the definition, '-' for stdin")
    actions.add_parser("list", help="list the plans")
    for name, text in PLAN_ACTIONS.items():
        action = actions.add_parser(name, help=text)
        action.add_argument("plan", help="plan id (plan-...)")


# -- commands ----------------------------------------------------------------------------
def _require_up(client: HyperClient) -> None:
    if not client.mirror.service_up:
        raise ClientError(f"hypervisord is not running on the {client.bus_spec} bus",
                          "ServiceUnknown")


def _provider_names(client: HyperClient, wanted: str | None) -> list[str]:
    providers = client.mirror.providers()
    if wanted:
        names = [p["name"] for p in providers]
        if names and wanted not in names:
            raise UsageError(f"--provider: unknown provider {wanted!r}; configured: "
                             + (", ".join(names) or "none"))
        return [wanted]
    return [p["name"] for p in providers if p.get("configured", True)]


async def cmd_vms(client: HyperClient, args, out: TextIO) -> int:
    """Every provider is asked; one that fails is reported and the others still listed."""
    vms: list[dict] = []
    names = _provider_names(client, args.provider)
    failed = 0
    for name in names:
        try:
            vms.extend(await client.list_vms(name))
        except ClientError as exc:
            if len(names) == 1:
                raise
            failed += 1
            print(f"hyperctl: {name}: {exc}", file=sys.stderr)
    code = EXIT_FAILED if failed else EXIT_OK
    if args.json:
        json.dump(vms, out, indent=2)
        out.write("\n")
        return code
    rows = [[vm.get("name", ""), vm.get("power_state", ""), str(vm.get("cpus", "")),
             fmt.memory_mb(vm.get("memory_mb")), fmt.size(vm.get("disk_bytes")),
             vm.get("guest_os", ""), vm.get("datacenter", ""), vm.get("provider", "")]
            for vm in vms]
    out.write(fmt.table(["NAME", "POWER", "CPUS", "MEMORY", "DISK", "GUEST OS", "DATACENTER",
                         "PROVIDER"], rows) + "\n")
    return code


def _read_definition(source: str) -> dict:
    try:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
    except OSError as exc:
        raise UsageError(f"{source}: cannot read: {exc.strerror}") from None
    name = "stdin" if source == "-" else source
    try:
        definition = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{name}: malformed JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    if not isinstance(definition, dict):
        raise UsageError(f"{name}: the definition must be a JSON object")
    return definition


async def cmd_submit(client: HyperClient, args, out: TextIO) -> int:
    definition = _read_definition(args.file)
    job_id = await client.submit(definition, args.kind)
    if args.json:
        out.write(json.dumps({"job_id": job_id}) + "\n")
    else:
        out.write(f"submitted {job_id}\n")
    if not args.watch:
        return EXIT_OK
    out.flush()
    await _wait_for_job(client, job_id)
    return await watch_job(client, job_id, out)


def _job_row(job: JobState, now: float) -> list[str]:
    return [job.id, job.status, job.get("Operation", ""), job.get("VM", ""),
            fmt.bar(job.progress, 10), fmt.rate(job.get("Rate")),
            fmt.duration(job.eta_seconds(now)), job.get("Stage", "") or job.get("Error", "")]


async def cmd_jobs(client: HyperClient, args, out: TextIO) -> int:
    """The jobs on the bus and the newest stored ones (finished jobs leave the bus)."""
    known = {**await client.recent_jobs(), **client.mirror.jobs}
    jobs = sorted((job for job in known.values() if not args.status or job.status == args.status),
                  key=lambda job: job.order)
    if args.json:
        json.dump([job.to_dict() for job in jobs], out, indent=2)
        out.write("\n")
        return EXIT_OK
    now = time.time()
    out.write(fmt.table(["ID", "STATUS", "OPERATION", "VM", "PROGRESS", "RATE", "ETA",
                         "STAGE"], [_job_row(job, now) for job in jobs]) + "\n")
    return EXIT_OK


class ProgressPrinter:
    """On a terminal one line redrawn in place; in a pipe a line per visible change."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = ""

    def line(self, job: JobState) -> str:
        eta = job.eta_seconds(time.time())
        parts = [job.id, f"{job.status:<9}", fmt.bar(job.progress), fmt.rate(job.get("Rate"))]
        if eta is not None:
            parts.append(f"ETA {fmt.duration(eta)}")
        if job.get("Stage"):
            parts.append(job.get("Stage"))
        return "  ".join(parts)

    def update(self, job: JobState) -> None:
        text = self.line(job)
        if self.tty:
            self.out.write("\r\033[K" + text)
        else:
            key = f"{job.status} {job.get('Stage')} {int((job.progress or 0) * 10)}"
            if key == self._last:
                return
            self._last = key
            self.out.write(text + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


async def _wait_for_job(client: HyperClient, job_id: str) -> None:
    """A job just submitted is announced by InterfacesAdded; wait until the mirror has it."""
    if job_id in client.mirror.jobs:
        return
    known = asyncio.Event()
    unsubscribe = client.subscribe(lambda event: known.set() if event.job_id == job_id else None)
    try:
        await asyncio.wait_for(known.wait(), 30)
    except asyncio.TimeoutError:
        raise ClientError(f"job {job_id} was not announced by the service", "Failed") from None
    finally:
        unsubscribe()


async def cmd_watch(client: HyperClient, args, out: TextIO) -> int:
    return await watch_job(client, args.job, out)


async def watch_job(client: HyperClient, identifier: str, out: TextIO) -> int:
    """Show the job's progress until it ends; 0 when it completed, 1 otherwise."""
    job = await client.find_job(identifier)
    printer = ProgressPrinter(out)
    ended = asyncio.Event()

    def on_event(event: ClientEvent) -> None:
        if event.job_id == job.id and event.type in ("job", "completed"):
            printer.update(job)
            if job.finished or event.type == "completed":
                ended.set()
        elif event.type == "service" and not client.mirror.service_up:
            ended.set()

    unsubscribe = client.subscribe(on_event)
    try:
        printer.update(job)
        if not job.finished:
            await ended.wait()
    finally:
        unsubscribe()
        printer.finish()
    if not client.mirror.service_up:
        raise ClientError("hypervisord left the bus while the job was running",
                          "ServiceUnknown")
    if job.status == "completed":
        out.write(f"{job.id} completed\n")
        verified = fmt.boot_verification(job.to_dict()["result"])
        if verified:
            out.write(f"boot verified: {verified}\n")
        return EXIT_OK
    print(f"hyperctl: {job.id} {job.status}: {job.get('Error') or 'no message'}",
          file=sys.stderr)
    return EXIT_FAILED


async def cmd_logs(client: HyperClient, args, out: TextIO) -> int:
    job = await client.find_job(args.job)
    async for line in client.follow_log(job.id, follow=args.follow):
        out.write(line.format() + "\n")
        out.flush()
    return EXIT_OK


async def cmd_cancel(client: HyperClient, args, out: TextIO) -> int:
    job = await client.find_job(args.job)
    await client.cancel(job.id)
    out.write(f"cancel requested for {job.id}\n")
    return EXIT_OK


async def cmd_cutover(client: HyperClient, args, out: TextIO) -> int:
    job = await client.find_job(args.job)
    await client.call_manager("CutoverJob", "s", job.id)
    out.write(f"cutover requested for {job.id}\n")
    return EXIT_OK


PLAN_ACTIONS = {"show": "print a plan and its per-VM status table as JSON",
                "preflight": "check every VM of a plan (exit 1 when one fails)",
                "start": "start a plan (after a preflight it must pass)",
                "cancel": "cancel a plan: release no more VMs, cancel running jobs",
                "cutover": "cut a warm plan over: every VM in pre-copy now, later ones soon",
                "report": "print a plan's report as JSON"}


def _plan_object(client: HyperClient, plan_id: str) -> str:
    path = plan_path(plan_id)
    if PLAN_IFACE not in client.mirror.objects.get(path, {}):
        raise UsageError(f"plan: no plan {plan_id!r}")
    return path


def _plan_json(client: HyperClient, path: str) -> dict:
    props = client.mirror.objects[path][PLAN_IFACE]
    return {"id": props.get("Id"), "name": props.get("Name"), "status": props.get("Status"),
            "provider": props.get("Provider"), "report_path": props.get("ReportPath"),
            "vms": json.loads(props.get("Vms") or "[]")}


async def cmd_plan(client: HyperClient, args, out: TextIO) -> int:
    """hyperctl plan create|list|show|preflight|start|cancel|report."""
    action = args.plan_command
    if action == "create":
        definition = _read_definition(args.file)
        path = await client.call_manager("CreatePlan", "s", json.dumps(definition))
        out.write(json.dumps({"plan_id": path.rsplit("/", 1)[-1].replace("_", "-")}) + "\n")
        return EXIT_OK
    if action == "list":
        plans = [_plan_json(client, path) for path in client.mirror.objects_under(PLANS_PATH)]
        out.write(fmt.table(["ID", "NAME", "STATUS", "PROVIDER", "VMS"],
                            [[p["id"], p["name"], p["status"], p["provider"], str(len(p["vms"]))]
                             for p in plans]) + "\n")
        return EXIT_OK
    path = _plan_object(client, args.plan)
    if action == "show":
        out.write(json.dumps(_plan_json(client, path), indent=2) + "\n")
        return EXIT_OK
    if action in ("start", "cancel", "cutover"):
        await client.call_object(path, PLAN_IFACE, action.capitalize())
        out.write(f"{action} requested for {args.plan}\n")
        return EXIT_OK
    member = {"preflight": "Preflight", "report": "GetReport"}[action]
    answer = json.loads(await client.call_object(path, PLAN_IFACE, member))
    out.write(json.dumps(answer, indent=2) + "\n")
    return EXIT_OK if action == "report" or answer["ok"] else EXIT_FAILED


COMMANDS = {"vms": cmd_vms, "submit": cmd_submit, "jobs": cmd_jobs, "watch": cmd_watch,
            "logs": cmd_logs, "cancel": cmd_cancel, "cutover": cmd_cutover, "plan": cmd_plan}


async def run_command(args, out: TextIO) -> int:
    client = HyperClient(args.bus)
    await client.connect()
    try:
        _require_up(client)
        return await COMMANDS[args.command](client, args, out)
    finally:
        client.close()


def exit_code(error: ClientError) -> int:
    if error.access_denied:
        return EXIT_NOPERM
    if error.unavailable:
        return EXIT_UNAVAILABLE
    if error.name == "InvalidArgument":
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        from .app import run_console  # noqa: PLC0415 - Textual only for the console
        return run_console(args.bus)
    try:
        return asyncio.run(run_command(args, sys.stdout))
    except UsageError as exc:
        print(f"hyperctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        print(f"hyperctl: {exc}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

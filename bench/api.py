"""Benchmark: the REST bridge against a bare aiohttp JSON endpoint, and WebSocket delivery.

Starts a private system bus, polkitd, a real hypervisord (with the test job kinds) and
a real hypersdk-bridge, plus a bare aiohttp "hello world" JSON server, each in its own
process. A load generator in another process (an aiohttp client; wrk is not installed)
then measures, in the same run and with the same client:

- requests/s of GET /health and GET /jobs/query?job_id=... on the bridge at
  --connections concurrent connections, against the bare server's GET /;
  goal: >= 0.5 x the bare server's rate;
- WebSocket delivery latency (p50/p99) for --ws-clients clients watching --jobs
  running "sleep" jobs: the time from the bridge turning a D-Bus signal into an
  update (its "time" field) to a client having it; goal: p99 < 100 ms.

    .venv/bin/python bench/api.py [--seconds 5] [--rounds 2] [--connections 50]
        [--ws-clients 200] [--jobs 20] [--watch-processes 4]

The load generator shares the 2 cores with the servers (and, on a shared box, with
everything else), so absolute rates are lower than wrk's and noisy; the server's own
CPU time per request, read from /proc, is printed too: its ratio is what a quiet
machine's throughput ratio would be.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- child roles -------------------------------------------------------------------------
def run_hello(port: int) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/", hello)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def load(url: str, seconds: float, connections: int) -> dict:
    """Keep `connections` requests in flight for `seconds`; count the answers."""
    done = errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def worker() -> None:
            nonlocal done, errors
            while time.monotonic() < deadline:
                async with session.get(url) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return {"url": url, "requests_per_second": done / seconds, "errors": errors}


async def watch(url: str, clients: int, seconds: float) -> dict:
    """`clients` WebSocket clients; latency of every update they receive."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(url) as ws:
            while time.monotonic() < deadline:
                try:
                    message = await ws.receive(timeout=max(0.05, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    return
                if message.type != aiohttp.WSMsgType.TEXT:
                    return
                sent = json.loads(message.data).get("time")
                if sent:
                    latencies.append(time.time() - sent)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return {"latencies": latencies}


def percentile(values: list[float], p: float) -> float:
    """The p-th fraction of sorted `values`, in ms."""
    return values[min(len(values) - 1, int(p * len(values)))] * 1000 if values else 0.0


def child(args: argparse.Namespace) -> None:
    if args.role == "hello":
        run_hello(args.port)
    elif args.role == "load":
        print(json.dumps(asyncio.run(load(args.url, args.seconds, args.connections))))
    elif args.role == "watch":
        print(json.dumps(asyncio.run(watch(args.url, args.ws_clients, args.seconds))))


# -- the run -----------------------------------------------------------------------------
def run_child(*arguments: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def run_watchers(url: str, clients: int, processes: int, seconds: str) -> list[float]:
    """Spread the WebSocket clients over a few processes so no client process is the
    bottleneck; all their latencies, sorted."""
    share = [clients // processes + (i < clients % processes) for i in range(processes)]
    children = [subprocess.Popen([sys.executable, __file__, "--role", "watch", "--url", url,
                                  "--ws-clients", str(n), "--seconds", seconds],
                                 stdout=subprocess.PIPE, text=True) for n in share]
    latencies: list[float] = []
    for child_process in children:
        output, _ = child_process.communicate()
        latencies.extend(json.loads(output)["latencies"])
    return sorted(latencies)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", url]).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--ws-clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--watch-processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--role", choices=["hello", "load", "watch"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return

    from tests.bridge.conftest import submit_sleep
    from tests.bridge.stack import ANY_PORT, Bridge
    from tests.support.servers import start_on_any_port
    from tests.support.hypervisord import Hypervisord, write_config
    from tests.support.system import PrivateSystemBus, start_polkitd, stop_process

    work = Path(tempfile.mkdtemp(prefix="hypersdk-bench-api-"))
    work.chmod(0o755)
    bus = PrivateSystemBus.start(work / "bus")
    polkitd = start_polkitd(bus, work / "polkit")
    config = write_config(work, daemon={"address": ANY_PORT, "log_level": "warning",
                                        "workers": args.jobs + 2},
                          api={"auth": "none"})  # the bridge's own cost, without token checks
    daemon = Hypervisord(config, bus.address)
    bridge = Bridge(config, bus.address)
    hello, hello_port = start_on_any_port([sys.executable, __file__, "--role", "hello",
                                           "--port", "0"], "the hello server")
    try:
        daemon.start()
        bridge.start()
        wait_http(f"http://127.0.0.1:{hello_port}/")
        job = submit_sleep(bus.address, steps=1, interval=0.01)
        seconds, connections = str(args.seconds), str(args.connections)
        targets = {"bare aiohttp GET /": (f"http://127.0.0.1:{hello_port}/", hello.pid),
                   "bridge GET /health": (f"{bridge.url}/health", bridge.process.pid),
                   "bridge GET /jobs/query": (f"{bridge.url}/jobs/query?job_id={job}",
                                              bridge.process.pid)}
        rates: dict[str, dict] = {}
        for _ in range(args.rounds):  # alternating rounds, best of each: the box is shared
            for name, (url, pid) in targets.items():
                cpu_before = cpu_seconds(pid)
                result = run_child("--role", "load", "--url", url, "--seconds", seconds,
                                   "--connections", connections)
                served = result["requests_per_second"] * args.seconds
                result["cpu_us_per_request"] = (cpu_seconds(pid) - cpu_before) / served * 1e6
                if result["requests_per_second"] > rates.get(name, {}).get(
                        "requests_per_second", -1):
                    rates[name] = result
        bare = rates["bare aiohttp GET /"]["requests_per_second"]
        bare_cpu = rates["bare aiohttp GET /"]["cpu_us_per_request"]
        print(f"HTTP, {args.connections} connections, best of {args.rounds} rounds of "
              f"{args.seconds:g} s:")
        for name, result in rates.items():
            rate = result["requests_per_second"]
            cpu = result["cpu_us_per_request"]
            print(f"  {name:26s} {rate:7.0f} req/s  ratio to bare {rate / bare:5.2f}  "
                  f"server CPU {cpu:6.0f} us/request (bare/this {bare_cpu / cpu:4.2f})  "
                  f"errors {result['errors']}")

        steps = int((args.seconds + 10) / 0.05)
        for _ in range(args.jobs):
            submit_sleep(bus.address, steps=steps, interval=0.05, step_bytes=1 << 20)
        time.sleep(0.5)
        cpu_before = cpu_seconds(bridge.process.pid)
        latencies = run_watchers(f"{bridge.url}/websocket", args.ws_clients,
                                 args.watch_processes, seconds)
        ws_cpu = cpu_seconds(bridge.process.pid) - cpu_before
        print(f"WebSocket, {args.ws_clients} clients in {args.watch_processes} processes, "
              f"{args.jobs} running jobs: {len(latencies)} updates, "
              f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms "
              "(goal p99 < 100 ms)")
        print(f"  bridge CPU {ws_cpu / max(1, len(latencies)) * 1e6:.1f} us per delivered update, "
              f"{ws_cpu / args.seconds * 100:.0f} % of a core")
        print(f"bridge RSS {bridge.rss_kib() / 1024:.1f} MiB")
    finally:
        stop_process(hello)
        bridge.stop()
        daemon.stop()
        stop_process(polkitd)
        bus.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO))
    main()

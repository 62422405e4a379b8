"""`GET /metrics` in the Prometheus text format: jobs by status, bytes, bridge requests."""
from __future__ import annotations

from collections import Counter

from hypersdk.client.names import JOB_IFACE, MANAGER_IFACE, MANAGER_PATH

from .mirror import ServiceMirror

# Any token is a valid HTTP method: count unknown ones together, or a client could
# grow the counter table without bound.
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class Metrics:
    """The bridge's own counters; job figures are read from the mirror when scraped."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()

    def count(self, method: str, route: str, status: int) -> None:
        self.requests[(method if method in KNOWN_METHODS else "OTHER", route, status)] += 1

    def render(self, mirror: ServiceMirror, websocket_clients: int, dropped: int,
               disconnected_slow: int) -> str:
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("hypersdk_up", "gauge", "1 when hypervisord is on the bus and mirrored.",
               [("", 1 if mirror.healthy else 0)])
        counts = (mirror.get(MANAGER_PATH, MANAGER_IFACE) or {}).get("JobCounts", {})
        metric("hypersdk_jobs", "gauge", "Jobs known to hypervisord, by status.",
               [(f'{{status="{status}"}}', n) for status, n in sorted(counts.items())])
        running = [p for ifaces in mirror.objects.values()
                   if (p := ifaces.get(JOB_IFACE)) and p.get("Status") == "running"]
        metric("hypersdk_running_jobs_bytes_done", "gauge",
               "Bytes done by the running jobs.", [("", sum(p.get("BytesDone", 0) for p in running))])
        metric("hypersdk_running_jobs_bytes_total", "gauge",
               "Bytes to do by the running jobs.", [("", sum(p.get("BytesTotal", 0) for p in running))])
        metric("hypersdk_running_jobs_rate_bytes", "gauge",
               "Bytes per second of the running jobs.", [("", sum(p.get("Rate", 0) for p in running))])
        metric("hypersdk_bridge_requests_total", "counter", "HTTP requests served by the bridge.",
               [(f'{{method="{m}",route="{r}",status="{s}"}}', n)
                for (m, r, s), n in sorted(self.requests.items())])
        metric("hypersdk_bridge_websocket_clients", "gauge", "Connected WebSocket clients.",
               [("", websocket_clients)])
        metric("hypersdk_bridge_websocket_dropped_updates_total", "counter",
               "Progress updates dropped for slow WebSocket clients.", [("", dropped)])
        metric("hypersdk_bridge_websocket_slow_disconnects_total", "counter",
               "WebSocket clients disconnected for falling too far behind.",
               [("", disconnected_slow)])
        return "\n".join(lines) + "\n"

"""Human renderings shared by the CLI and the console: sizes, rates, durations, bars."""
from __future__ import annotations

from typing import Any

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(nbytes: int | float | None) -> str:
    if not nbytes:
        return "0 B" if nbytes == 0 else "—"
    value = float(nbytes)
    for unit in UNITS:
        if value < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {UNITS[-1]}"  # pragma: no cover - loop always returns


def rate(bytes_per_second: int | float | None) -> str:
    return f"{size(bytes_per_second)}/s" if bytes_per_second else "—"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(fraction: float | None, width: int = 20) -> str:
    """A text progress bar; an unknown fraction is drawn empty with '?'."""
    if fraction is None:
        return "░" * width + "   ?"
    fraction = min(max(fraction, 0.0), 1.0)
    filled = int(round(fraction * width))
    return "█" * filled + "░" * (width - filled) + f" {fraction * 100:3.0f}%"


def memory_mb(megabytes: int | None) -> str:
    return size((megabytes or 0) * 1024 * 1024) if megabytes else "—"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Plain left-aligned columns for a terminal or a pipe."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def boot_verification(result: Any) -> str:
    """How and when a job's guest was seen booted ('console at 2026-...Z: host login:'),
    "" when its result has no verification: at the top of an import job's result,
    under hyper2kvm.import in an export job's."""
    if not isinstance(result, dict):
        return ""
    landed = (result.get("hyper2kvm") or {}).get("import") or result
    verification = landed.get("verification") or {}
    if not verification.get("verified"):
        return ""
    seen = verification.get("seen") or [""]
    return f"{verification.get('method')} at {verification.get('at')}: {seen[-1]}"

"""The configured providers, created on first use and shared by all jobs.

A provider module (`providers/<kind>.py`) declares:
- `CONFIG_SCHEMA`: its config section (see config_schema.Field),
- `CONFIG_FINISH` (optional): `(section, path) -> [ConfigProblem]`, run on the checked
  section for rules between its keys; it may fill values derived from others,
- `PROVIDER_CLASS`: its Provider subclass,
- `SDK_MODULES`: the optional packages it needs, e.g. ("boto3",), all from the
  extra named like the kind (`pip install hypersdk[aws]`).
"""
from __future__ import annotations

import asyncio
import difflib
import importlib
import importlib.util

from ..config import PROVIDER_KINDS, Config
from ..errors import InvalidArgument, Unavailable
from .base import Provider

EXTRA_FOR_KIND = {"aws": "aws", "azure": "azure", "gcp": "gcp", "oci": "oci", "hyperv": "hyperv"}
ALWAYS_ON_KINDS = ("ova",)  # usable without a config section


def provider_module(kind: str):
    return importlib.import_module(f"hypersdk.service.providers.{kind}")


def missing_sdk(kind: str) -> str | None:
    """The reason a kind cannot run here (a missing extra), or None."""
    try:
        module = provider_module(kind)
    except ImportError as exc:
        return f"provider module for {kind} is not part of this build ({exc})"
    for name in getattr(module, "SDK_MODULES", ()):
        if not _importable(name):
            extra = EXTRA_FOR_KIND.get(kind, kind)
            return f"needs the Python package {name!r}: pip install hypersdk[{extra}]"
    return None


def _importable(module_name: str) -> bool:
    """Whether the full dotted module exists (a bare 'google' says nothing about compute_v1)."""
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def warm_reason(kind: str) -> str:
    """Why a kind cannot do warm migration ("": it can)."""
    if missing_sdk(kind):
        return "the provider cannot run here"
    return provider_module(kind).PROVIDER_CLASS.warm_unsupported


def _warm_row(kind: str) -> dict:
    reason = warm_reason(kind)
    return {"warm": not reason, "warm_reason": reason}


class ProviderRegistry:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._settings = dict(config.providers)
        for kind in ALWAYS_ON_KINDS:
            self._settings.setdefault(kind, {"type": kind, "enabled": True})
        self._instances: dict[str, Provider] = {}
        self._lock = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self._settings)

    def settings(self, name: str) -> dict:
        if name not in self._settings:
            close = difflib.get_close_matches(name, self._settings, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            known = ", ".join(self.names) or "none"
            raise InvalidArgument("provider", f"unknown provider {name!r}{hint}; configured: {known}")
        return self._settings[name]

    def check_usable(self, name: str) -> None:
        """Raise unless a job for `name` could run: configured, enabled, SDK present."""
        settings = self.settings(name)
        if not settings.get("enabled", True):
            raise Unavailable(f"provider {name!r} is disabled in the config")
        reason = missing_sdk(settings["type"])
        if reason:
            raise Unavailable(f"provider {name!r} is unavailable: {reason}")

    def warm_unsupported(self, name: str) -> str | None:
        """Why provider `name` cannot do warm migration, or None when it can."""
        kind = self.settings(name)["type"]
        reason = warm_reason(kind)
        return f"provider {name!r} ({kind}) cannot do warm migration: {reason}" if reason else None

    async def get(self, name: str) -> Provider:
        self.check_usable(name)
        async with self._lock:
            if name not in self._instances:
                settings = self._settings[name]
                cls = provider_module(settings["type"]).PROVIDER_CLASS
                self._instances[name] = cls(name, settings, self._config)
            return self._instances[name]

    def capabilities(self) -> list[dict]:
        """Every known kind and configured name, with whether it can run here and why not;
        `implicit`: configured without a config section (ALWAYS_ON_KINDS)."""
        rows = []
        for name in self.names:
            settings = self._settings[name]
            reason = None if settings.get("enabled", True) else "disabled in the config"
            reason = reason or missing_sdk(settings["type"])
            rows.append({"name": name, "type": settings["type"], "configured": True,
                         "implicit": name not in self._config.providers,
                         "available": reason is None, "reason": reason or "",
                         **_warm_row(settings["type"])})
        configured_kinds = {s["type"] for s in self._settings.values()}
        for kind in PROVIDER_KINDS:
            if kind not in configured_kinds:
                reason = missing_sdk(kind)
                rows.append({"name": kind, "type": kind, "configured": False,
                             "available": False,
                             "reason": reason or "not configured (add providers." + kind + ")",
                             **_warm_row(kind)})
        return rows

    async def close(self) -> None:
        for provider in self._instances.values():
            await provider.close()
        self._instances.clear()

"""What Linux's /proc/cpuinfo says about this machine's CPU (empty answers elsewhere). No torch here."""

from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.cache
def _cpuinfo_field(name: str) -> str | None:
    """The value of the first `name : value` line, or None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (x86 `flags`, arm `Features`); empty where nothing says."""
    return frozenset((_cpuinfo_field("flags") or _cpuinfo_field("Features") or "").split())

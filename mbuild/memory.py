"""How much memory a build may use, and whether it streams (is larger than that memory)."""

from __future__ import annotations

import os
from pathlib import Path

# What the process holds besides its tasks: the interpreter, torch and mbuild imported (about
# 230 MB measured with torch 2.13's CPU build), the plan, read and write buffers.
BASELINE = 300 * 1000**2
# Elements per slice of an element-wise method: 1 MiB per float32 input, so a slice's
# conversions and temporaries stay in cache instead of being tensor-sized buffers.
ELEMENTWISE_SLICE = 1 << 18
# Bytes of coming tasks' inputs the kernel is asked to read ahead (page cache, not ours).
READ_AHEAD = 256 * 1024**2


def available_memory() -> int:
    """The memory this process may fill: its cgroup's limit less what the cgroup uses, else
    the machine's MemAvailable (free memory plus reclaimable page cache)."""
    values = [value for value in (_meminfo_available(), _cgroup_room()) if value is not None]
    return max(0, min(values)) if values else 8 * 1024**3


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """The limit of this process's memory cgroup (v2 or v1) less its anonymous memory, if limited.

    The page cache a cgroup holds counts against its limit but is reclaimed under pressure, so
    only what cannot be reclaimed is taken off.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":  # v2
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file, stat_file, anon_key = folder / "memory.max", folder / "memory.stat", "anon"
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, stat_file, anon_key = folder / "memory.limit_in_bytes", folder / "memory.stat", "rss"
        else:
            continue
        try:
            text = limit_file.read_text().strip()
        except OSError:
            continue
        if text == "max" or not text.isdigit() or int(text) >= 1 << 60:
            return None
        used = 0
        try:
            for entry in stat_file.read_text().splitlines():
                key, _, value = entry.partition(" ")
                if key == anon_key:
                    used = int(value)
        except (OSError, ValueError):
            pass
        return int(text) - used
    return None


def task_budget(available: int | None = None) -> int:
    """Bytes the tasks running at once may hold together: what is available less the baseline
    and the read-ahead (the environment variable MBUILD_MEMORY, in bytes, overrides)."""
    configured = os.environ.get("MBUILD_MEMORY")
    if configured and configured.isdigit():
        return int(configured)
    room = available_memory() if available is None else available
    return max(64 * 1024**2, room - BASELINE - READ_AHEAD)

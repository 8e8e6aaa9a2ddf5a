"""How the `mbuild` command starts and ends, and glibc's allocator tuned for tensors.

A build restarts itself once, before importing anything heavy, with glibc's allocator
tuned for tensor-sized buffers (see `ALLOCATOR_TUNABLES`). These settings only take effect
when set before the process starts; `tune_allocator` applies the same at run time where
the restart did not happen (library use). This module imports nothing of mbuild's.
"""

import os
import sys
from typing import Callable

# Buffers up to 32 MiB (glibc's largest mmap threshold) are recycled from at most two heaps
# instead of being mapped, zero-filled and unmapped each time: a build allocates and frees
# such buffers for every tensor, and faulting them in afresh is a large part of a small
# model's build. Glibc's default would also create a heap per worker thread and keep freed
# memory in each, so peak RSS would grow with the thread count; two heaps bound it.
# Larger buffers (most tensors of a 7B model) are mappings of their own, returned when freed.
ARENA_MAX = 2
MMAP_THRESHOLD = TRIM_THRESHOLD = 32 * 1024 * 1024
ALLOCATOR_TUNABLES = (
    f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
    f":glibc.malloc.arena_max={ARENA_MAX}"
)
# The commands that are not builds (no allocator restart, no fast exit).
SUBCOMMANDS = ("status", "graph", "methods", "explain", "gc", "clean", "import", "lock", "push", "report", "check", "search")


def run(main: Callable[[list[str]], int]) -> None:
    """Run ``main`` on the command line's arguments, restarting a build once with the allocator tuned (Linux)."""
    argv = sys.argv[1:]
    is_build = not (argv and argv[0] in SUBCOMMANDS) and not {"-n", "--dry-run", "-h", "--help"} & set(argv)
    if is_build and sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
        try:
            os.execv(sys.executable, [sys.executable, "-m", "mbuild", *argv])
        except OSError:
            pass  # run untuned rather than not at all
    code = main(argv)
    if is_build:
        _exit_without_teardown(code)
    sys.exit(code)


def _exit_without_teardown(code: int) -> None:
    """End a finished build at once: tearing torch down is slow, and nothing needs it.

    By now every output is published and fsynced, the tensor cache is closed and each
    SQLite commit is durable on its own, so nothing is left for exit handlers to do; only
    Python's buffered output is, and it is flushed here.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe or stream: nothing more can reach it anyway
    os._exit(code)


def tune_allocator() -> None:
    """Apply `ALLOCATOR_TUNABLES` at run time, unless the environment set them.

    A fixed 32 MiB mmap threshold and two heaps at most: buffers of that size are recycled
    rather than faulted in afresh, and freed memory is not kept in one heap per thread.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.environ.get("MALLOC_MMAP_THRESHOLD_") or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-8, ARENA_MAX)  # M_ARENA_MAX, before the worker threads start
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass

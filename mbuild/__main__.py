"""`python -m mbuild` and the `mbuild` console script.

A build restarts itself once, before importing anything heavy, with glibc's allocator
tuned for tensor-sized buffers: such buffers get their own mappings, returned to the OS
when freed (so peak RSS stays at the live tensors instead of growing with every worker
thread), backed by transparent huge pages (far fewer page faults). These settings only
take effect when set before the process starts.
"""

import os
import sys

ALLOCATOR_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=33554432"
NOT_BUILDS = {"status", "graph", "methods", "explain", "gc", "clean", "import"}


def entry() -> None:
    """Run the command line, restarting a build once with the allocator tuned (Linux)."""
    argv = sys.argv[1:]
    is_build = not (argv and argv[0] in NOT_BUILDS) and not {"-n", "--dry-run", "-h", "--help"} & set(argv)
    if is_build and sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ:
        os.environ["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
        try:
            os.execv(sys.executable, [sys.executable, "-m", "mbuild", *argv])
        except OSError:
            pass  # run untuned rather than not at all
    from mbuild.cli import main

    sys.exit(main(argv))


if __name__ == "__main__":
    entry()

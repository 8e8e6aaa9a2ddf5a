"""The compute platform: what, besides a task's inputs and recipe, decides the bytes it makes.

On the CPU mbuild runs torch single-threaded inside each task, so neither -j, the core count
nor any thread setting changes a result. What still can: the kernels torch picks for the
CPU's vector class (without AVX2 and FMA, torch's vectorised loops round differently), the
CPU architecture, torch's version (its kernels change between releases) and, on a GPU, the
GPU model and CUDA version. Each task that computes carries its platform in its key, so bytes
made on one platform never pass for another's; plain byte copies carry none and are shared.

Computed without importing torch on x86-64 Linux, so a no-op build stays fast.
"""

from __future__ import annotations

import functools
import os
import platform as host
from importlib import metadata


def identify(device: str = "cpu") -> str:
    """The platform tasks computed on `device` ("cpu", "cuda", "cuda:N") are keyed under."""
    if device.startswith("cuda"):
        return _cuda_platform(device)
    return f"cpu:{_cpu_class()}:torch-{_torch_release()}"


def as_torch_sees_it(device: str = "cpu") -> str:
    """The platform of `device` from torch itself (imports torch): what `identify` predicts."""
    if device.startswith("cuda"):
        return _cuda_platform(device)
    return f"cpu:{host.machine().lower().replace('amd64', 'x86_64')}-{torch_cpu_capability()}:torch-{_torch_release()}"


def _torch_release() -> str:
    """torch's major.minor, read from its installed metadata (no import)."""
    try:
        version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"
    return ".".join(version.split("+")[0].split(".")[:2])


@functools.cache
def _cpu_class() -> str:
    """The CPU's architecture and torch's vector class for it: "x86_64-avx512", "aarch64-sve256"...

    Each class is its own platform: Arcee Fusion's bytes differ between torch's AVX2 and
    AVX-512 kernels (tests/test_determinism.py), and linear's between AVX2 and none.
    The engine checks the class named here against torch's own before it computes.
    """
    machine = host.machine().lower()
    if machine in ("x86_64", "amd64"):
        flags = _x86_flags()
        if flags is None:
            return f"x86_64-{torch_cpu_capability()}"
        return f"x86_64-{_x86_capability(flags, os.environ.get('ATEN_CPU_CAPABILITY', ''))}"
    return f"{machine}-{torch_cpu_capability()}"


def _x86_capability(flags: set[str], forced: str) -> str:
    """The kernels torch picks on x86-64: the widest the CPU has, or a narrower one it is told to use."""
    supported = ["default"]
    if {"avx2", "fma"} <= flags:
        supported.append("avx2")
        if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
            supported.append("avx512")
    forced = forced.strip().lower()
    return forced if forced in supported else supported[-1]


def _x86_flags() -> set[str] | None:
    """The CPU flags from /proc/cpuinfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def torch_cpu_capability() -> str:
    """torch's own name for the CPU kernels it runs, lower-cased (imports torch)."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability().lower()
    except AttributeError:  # torch before 2.1
        return "unknown"


def _cuda_platform(device: str) -> str:
    import torch

    index = torch.device(device).index or 0
    name = torch.cuda.get_device_name(index).replace(":", " ")
    return f"cuda:{name}:cuda-{torch.version.cuda}:torch-{_torch_release()}"

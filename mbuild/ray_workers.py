"""What runs on a Ray cluster's nodes for `mbuild.ray_executor`: jobs computed into shared storage.

A Ray task takes a group of `Job`s (tensor tasks with their inputs named by path) and the
`Storage`; it computes them one after the other exactly as a local build does (torch
single-threaded, the plan's compute platform checked first), writes each job's bytes at its
place in the output's shard (or, for a target not being built yet, into the storage under
the job's key) and returns a `JobResult` per job: the digest and the node. Weights never
pass through Ray's object store.

Ray gives every driver new worker processes, and a worker that imported torch itself would
spend about two CPU-seconds on it before its first job: more than a small build's whole
arithmetic. So a CPU task only holds its jobs' CPU and memory on its node (`relay_jobs`),
while the node's warm worker computes them (`WarmWorker`): one detached actor per node and
installed mbuild, which asks Ray for nothing itself and so runs as many jobs at once as
tasks hold CPUs there. It exits once no job came for `MBUILD_RAY_KEEP_WARM` seconds (600;
0: no warm workers, each task computes its jobs itself, as GPU tasks always do, on the GPU
Ray gave them).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

from mbuild.errors import BuildError, MbuildError
from mbuild.executors import Job, JobResult
from mbuild.storage import Storage

# Seconds a node's warm worker waits for a job before it exits (MBUILD_RAY_KEEP_WARM).
KEEP_WARM_S = 600.0
# Seconds without a job after which a warm worker gives its freed memory back to the system
# (sooner, and the next build of an edit-and-rebuild loop would fault it all in again).
TRIM_AFTER_S = 30.0
# The warm workers' namespace on the cluster.
NAMESPACE = "mbuild"
# Times a task asks for its node's warm worker when the one it found has exited.
WARM_ATTEMPTS = 20


def keep_warm_seconds() -> float:
    """Seconds a node's warm worker waits for jobs (MBUILD_RAY_KEEP_WARM; 0: no warm workers)."""
    text = os.environ.get("MBUILD_RAY_KEEP_WARM", "").strip()
    if not text:
        return KEEP_WARM_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise MbuildError(f"MBUILD_RAY_KEEP_WARM={text!r}: give the seconds a node's warm worker waits for jobs (0: none)")
    return seconds


def compute_job(job: Job, storage: Storage) -> JobResult:
    """Run one job on this machine: its bytes into their place (or the storage), their digest back."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    found = storage.find(job.key) if job.destination is None else None
    if found is not None:
        return JobResult(job.key, found, node, computed=False)
    from mbuild import __version__, compute_platform, io, operations
    from mbuild.engine import torch_single_threaded

    if job.version != __version__:
        raise BuildError(f"node {node[:12]} runs mbuild {__version__}, the driver {job.version}: install one version")
    if job.platform and compute_platform.as_torch_sees_it(job.device) != job.platform:
        raise BuildError(
            f"node {node[:12]} computes on {compute_platform.as_torch_sees_it(job.device)}, but the plan keyed its "
            f"tensors for {job.platform}; give the cluster one CPU class or set ATEN_CPU_CAPABILITY alike"
        )
    import torch

    reader = io.TensorReader()
    try:
        with torch_single_threaded():
            inputs = operations.Inputs(job.models, reader, torch.device(job.device), job.target, job.vocabulary)
            data = io.raw_bytes(operations.operation(job.task.method).compute(job.task, inputs))
    finally:
        reader.close()
    if job.destination is not None:
        return JobResult(job.key, _write_at(job.destination, data), node, computed=True, written=True)
    digest = storage.put(job.key, data)
    return JobResult(job.key, digest, node, computed=True)


def compute_jobs(jobs: list[Job], storage: Storage) -> list[JobResult]:
    """Run a group of jobs one after the other; a failure names its tensor and target."""
    results = []
    for job in jobs:
        try:
            results.append(compute_job(job, storage))
        except MbuildError:
            raise
        except Exception as error:
            raise BuildError(
                f"tensor '{job.task.name}' of target '{job.target.name}' failed on the Ray cluster: "
                f"{type(error).__name__}: {error}",
                job.target.location(),
            ) from None
    return results


def _write_at(destination: tuple[str, int, int], data) -> str:
    """Write a job's bytes at their place in the output's shard (its space is reserved); their digest."""
    from mbuild import keys
    from mbuild.io.files import write_at

    path, offset, length = destination
    if len(data) != length:
        raise BuildError(f"{path}: {len(data)} bytes computed for a place of {length}")
    digest = keys.tensor_digest(data)
    fd = os.open(path, os.O_WRONLY)
    try:
        write_at(fd, data, offset)
    finally:
        os.close(fd)  # on NFS, close sends the writes to the server (close-to-open)
    return digest


def relay_jobs(blob: bytes, storage: Storage, keep_warm: float) -> list[JobResult]:
    """A Ray task that holds its jobs' CPU and memory while its node's warm worker computes them.

    ``blob`` is the pickled list of `Job`s: this worker never imports torch, so it never reads it.
    """
    return call_warm_worker("compute", keep_warm, blob, storage)


def warm_up(keep_warm: float) -> None:
    """Start this worker, and its node's warm worker unless there is one (that one imports torch)."""
    if keep_warm > 0:
        call_warm_worker("ready", keep_warm)
        return
    import torch  # noqa: F401

    from mbuild import engine, operations  # noqa: F401


class WarmWorker:
    """One node's process that computes jobs, kept between builds so that torch is imported once.

    It asks Ray for no resources: the jobs it runs are held by the Ray tasks that called it.
    Torch runs single-threaded, as in every job; jobs run side by side on the actor's threads.
    """

    def __init__(self, keep_warm: float):
        from mbuild import launcher

        launcher.tune_allocator()
        import torch

        from mbuild import engine, operations  # noqa: F401

        torch.set_num_threads(1)
        self.keep_warm = keep_warm
        self.lock = threading.Lock()
        self.active = 0
        self.closing = False
        self.trimmed = True
        self.last = time.monotonic()
        threading.Thread(target=self._expire, daemon=True).start()

    def ready(self, keep_warm: float) -> int:
        """Its process id, once torch is imported; the caller's keep-warm time applies from now."""
        with self.lock:
            self._arrive(keep_warm)
            self.last = time.monotonic()
        return os.getpid()

    def compute(self, blob: bytes, storage: Storage, keep_warm: float) -> list[JobResult]:
        """The jobs pickled in ``blob``, computed one after the other; their results."""
        from ray import cloudpickle

        with self.lock:
            self._arrive(keep_warm)
            self.active += 1
        try:
            return compute_jobs(cloudpickle.loads(blob), storage)
        finally:
            with self.lock:
                self.active -= 1
                self.last = time.monotonic()
                self.trimmed = False

    def _arrive(self, keep_warm: float) -> None:
        """A call comes (the lock held): refused if exiting; the latest build's keep-warm time applies."""
        if self.closing:
            raise WarmWorkerClosed()
        self.keep_warm = keep_warm

    def _expire(self) -> None:
        """Give freed memory back between builds; exit once no job has come for `keep_warm` seconds."""
        import ray

        while True:
            time.sleep(1.0)
            with self.lock:
                idle = time.monotonic() - self.last if self.active == 0 else 0.0
                if idle >= self.keep_warm:
                    self.closing = True
                    break
                trim = idle >= TRIM_AFTER_S and not self.trimmed
                self.trimmed |= trim
            if trim:  # within a build, freed buffers are reused as they are
                _return_freed_memory()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class WarmWorkerClosed(Exception):
    """The warm worker asked is exiting: the caller asks for a new one."""


def call_warm_worker(method: str, keep_warm: float, *arguments):
    """Call this node's warm worker, starting one if there is none (or the one found has exited);
    ``keep_warm`` goes to the call too, as the last argument every `WarmWorker` method takes."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    node = ray.get_runtime_context().get_node_id()
    for attempt in range(WARM_ATTEMPTS):
        worker = _warm_worker(node, keep_warm, fresh=attempt > 0)
        try:
            return _get_holding_resources(getattr(worker, method).remote(*arguments, keep_warm))
        except RayActorError:
            pass  # exited, or killed for memory: a new one
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if not isinstance(cause, WarmWorkerClosed):
                raise (cause if cause is not None else error) from None
        time.sleep(0.05 * (attempt + 1))
    raise BuildError(f"node {node[:12]}: its warm worker exited {WARM_ATTEMPTS} times in a row")


def _get_holding_resources(ref):
    """`ray.get` that keeps the calling task's CPU and memory held while it waits.

    Ray lends a task's resources out while the task's main thread waits in `ray.get`, and
    starts other tasks (and worker processes) on them; a wait on another thread does not.
    The relay waits while its jobs compute: those resources are theirs.
    """
    import ray

    outcome: list = []

    def wait() -> None:
        try:
            outcome.append((True, ray.get(ref)))
        except BaseException as error:  # handed to the task's own thread
            outcome.append((False, error))

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join()
    succeeded, value = outcome[0]
    if not succeeded:
        raise value
    return value


_WARM: dict[str, Any] = {}  # node -> this process's handle on the node's warm worker


def _warm_worker(node: str, keep_warm: float, fresh: bool = False):
    """This node's warm worker for the mbuild installed here: found by name, else started."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if fresh or node not in _WARM:
        _WARM[node] = (
            ray.remote(WarmWorker)
            .options(
                name=warm_name(node),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=max(32, 4 * (os.cpu_count() or 1)),
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote(keep_warm)
        )
    return _WARM[node]


def warm_name(node: str) -> str:
    """The name of a node's warm worker for the mbuild installed in this process's environment."""
    return f"mbuild-warm-{_installation()}-{node}"


@functools.lru_cache(maxsize=None)
def _installation() -> str:
    """A mark of the Python, mbuild and torch installed here: a warm worker started before an
    upgrade or an edit has another name, so it is never asked again (it exits when its time is up)."""
    import hashlib
    import importlib.util
    import sys
    from pathlib import Path

    marks = [sys.executable, sys.version]
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".so", ".c"):
            stat = path.stat()
            marks.append(f"{path.relative_to(package)}:{stat.st_size}:{stat.st_mtime_ns}")
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        version = Path(spec.origin).parent / "version.py"
        if version.exists():
            marks.append(version.read_text())
    return hashlib.sha256("\n".join(marks).encode()).hexdigest()[:16]


def _return_freed_memory() -> None:
    """Give freed heap back to the system while the warm worker waits (glibc; elsewhere nothing)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass

"""The Ray executor: tensor tasks as Ray tasks over a cluster, bytes through shared storage.

Each Ray task gets one `Job` (a tensor task with its inputs named by path) and the
`Storage`; it reads the inputs from storage every node sees, computes exactly as a local
build does (torch single-threaded, the plan's compute platform checked first), writes the
bytes to the storage under the task's key and returns a `JobResult`: the digest and the
node. Weights never pass through Ray's object store. The driver writes each result into
the output's shard as it comes, so outputs, the manifest, the lock and the publish are
those of a local build.

Ray retries a job whose worker or node died (`max_retries`); a job's write is atomic, so
a retried or duplicated job leaves one whole result. A job killed with its driver leaves
its finished results in the storage, where the next run finds them.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Any, Iterable

from mbuild.errors import BuildError, MbuildError
from mbuild.executors import Done, Job, JobResult, Work
from mbuild.storage import Storage

# Ray tasks of the cluster in flight at once, per CPU of the cluster (bounds storage in use).
IN_FLIGHT_PER_CPU = 4
# Ray retries a job this many times when its worker or node dies.
RETRIES = 4


def _warm_up() -> None:
    """What a worker imports before its first job."""
    import torch  # noqa: F401

    from mbuild import engine, operations  # noqa: F401


def compute_job(job: Job, storage: Storage) -> JobResult:
    """Run one job on this machine: its bytes into the storage, their digest back."""
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


class RayExecutor:
    """Tensor tasks on a Ray cluster: `Job`s out, `JobResult`s back, bytes through `storage`."""

    runs_elsewhere = True

    def __init__(self, storage: Storage, address: str | None = None, device: str = "cpu"):
        try:
            import ray
        except ImportError:
            raise MbuildError("--executor ray needs Ray: pip install 'mbuild[ray]'") from None
        self.ray = ray
        self.storage = storage
        self.device = device
        self._started_here = False
        if not ray.is_initialized():
            self._connect(address)
        self.driver_node = ray.get_runtime_context().get_node_id()
        self._remote = ray.remote(compute_job)
        self.pending: dict[str, Any] = {}  # key -> ObjectRef of a job started ahead
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = max(2, IN_FLIGHT_PER_CPU * cpus)
        # Workers start with this run (Ray gives each driver its own) and import torch before
        # their first job: start them now, while the driver plans and hashes.
        self._warming = [ray.remote(_warm_up).options(num_cpus=1).remote() for _ in range(cpus)]
        # Until then the driver computes the tasks itself, unless told not to (MBUILD_RAY_DRIVER_TASKS=0).
        self._warm = os.environ.get("MBUILD_RAY_DRIVER_TASKS", "1") == "0"
        self._looked = 0.0  # when the warm-up was last looked at

    def _connect(self, address: str | None) -> None:
        ray = self.ray
        options = dict(logging_level="WARNING", log_to_driver=False, configure_logging=True)
        if address and address != "auto":
            problem = _unreachable(address)
            if problem:  # Ray itself would retry for minutes
                raise MbuildError(f"cannot reach the Ray cluster at {address}: {problem}")
            try:
                ray.init(address=address, **options)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise MbuildError(f"cannot reach the Ray cluster at {address}: {error}") from None
            return
        current = _current_cluster()  # the cluster this machine is part of, if it answers
        if current and not _unreachable(current):
            try:
                ray.init(address=current, **options)
                return
            except (ConnectionError, RuntimeError, ValueError):
                if address == "auto":
                    raise MbuildError(f"cannot reach the Ray cluster at {current} (from ray start)") from None
        elif address == "auto":
            raise MbuildError("no Ray cluster is running on this machine (ray start --head starts one)")
        ray.init(include_dashboard=False, **options)  # else a Ray of our own, for this run
        self._started_here = True

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes: id and resources."""
        return [
            {"id": node["NodeID"], "resources": node.get("Resources", {})}
            for node in self.ray.nodes()
            if node.get("Alive")
        ]

    def check(self, largest: Job | None) -> None:
        """Refuse a job that asks for more memory (or a GPU) than any live node has."""
        if largest is None:
            return
        wants_gpu = largest.device.startswith("cuda")
        fits = [
            node
            for node in self.nodes()
            if node["resources"].get("memory", 0) >= largest.memory
            and node["resources"].get("CPU", 0) >= 1
            and (not wants_gpu or node["resources"].get("GPU", 0) >= 1)
        ]
        if not fits:
            most = max((n["resources"].get("memory", 0) for n in self.nodes()), default=0)
            need = "a GPU and " if wants_gpu else ""
            raise BuildError(
                f"tensor '{largest.task.name}' of target '{largest.target.name}' needs {need}about "
                f"{_gb(largest.memory)} of memory, and no node of the Ray cluster offers that (the largest has "
                f"{_gb(most)}); add a larger node or give the nodes more memory (ray start --memory)",
                largest.target.location(),
            )

    def _submit(self, job: Job):
        options: dict[str, Any] = {"memory": max(1, job.memory), "max_retries": RETRIES, "num_cpus": 1}
        if job.device.startswith("cuda"):
            options["num_gpus"] = 1
        return self._remote.options(**options).remote(job, self.storage)

    def prefetch(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            if job.key not in self.pending:
                self.pending[job.key] = self._submit(job)

    def run(self, tasks: Iterable[Any], work: Work, done: Done) -> None:
        waiting: dict[Any, list] = defaultdict(list)  # ObjectRef -> the tasks it serves
        by_key: dict[str, Any] = {}
        for task in tasks:
            outcome = work.settle(task)
            if outcome is not None:
                done(outcome, None)
                continue
            job = work.job(task)
            if job is None:
                done(work.run(task), self.driver_node)
                continue
            ref = by_key.get(job.key) or self.pending.pop(job.key, None)
            if ref is None and not self._workers_ready():
                # No worker has its imports done yet: the driver computes meanwhile.
                done(work.run(task), self.driver_node)
                continue
            ref = by_key[job.key] = ref or self._submit(job)
            waiting[ref].append(task)
            if len(waiting) >= self.in_flight:
                self._collect(waiting, work, done)
        while waiting:
            self._collect(waiting, work, done)

    def _workers_ready(self) -> bool:
        """Whether the workers' warm-up is over (looked at every 0.1 s at most: a look costs milliseconds)."""
        if not self._warm and time.monotonic() - self._looked > 0.1:
            self._looked = time.monotonic()
            self._warm = not self.ray.wait(self._warming, num_returns=len(self._warming), timeout=0)[1]
        return self._warm

    def _collect(self, waiting: dict, work: Work, done: Done) -> None:
        """Wait for one job, then take every other that is done too (a wait costs milliseconds)."""
        refs = list(waiting)
        ready, rest = self.ray.wait(refs, num_returns=1)
        if rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            tasks = waiting.pop(ref)
            result = self._result(ref, tasks[0])
            if result.written:
                done(work.written(tasks[0], result.digest), result.node)
                for task in tasks[1:]:  # a twin: from the cache, as locally
                    done(work.run(task), self.driver_node)
                continue
            for index, task in enumerate(tasks):
                data = self.storage.read(result.key, result.digest)
                if data is None:  # gone or damaged since (a gc, a disk fault): computed here instead
                    done(work.run(task), self.driver_node)
                    continue
                # A repeated layer's twin shares its job: computed once, reused after.
                done(work.accept(task, data, result.digest, result.computed and index == 0), result.node)
            # In the output's shard and the tensor cache now: the storage's copy has served.
            self.storage.delete(result.key)

    def _result(self, ref, task) -> JobResult:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as error:
            cause = getattr(error, "cause", None)
            if isinstance(cause, MbuildError):
                raise cause from None
            raise BuildError(f"tensor '{task.name}' failed on the Ray cluster: {cause or error}") from None
        except RayError as error:
            raise BuildError(f"tensor '{task.name}' was lost on the Ray cluster ({type(error).__name__}): {error}") from None

    def close(self) -> None:
        for ref in [*self.pending.values(), *self._warming]:
            self.ray.cancel(ref)
        self.pending.clear()
        if self._started_here:
            self.ray.shutdown()


def _unreachable(address: str) -> str | None:
    """Why HOST:PORT does not accept a connection within 5 s, or None if it does."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return f"not HOST:PORT: {address!r}"
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        return error.strerror or str(error)
    return None


def _current_cluster() -> str | None:
    """The address `ray start` left for this machine's cluster (Ray's own file), if any."""
    import tempfile

    try:
        with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as file:
            return file.read().strip() or None
    except OSError:
        return None


def _gb(count: float) -> str:
    return f"{count / 1e9:.2f} GB"


def storage_in(folder) -> Storage:
    """The storage of results beside the tensor cache (``--cache-dir`` on shared storage)."""
    from mbuild.storage import SharedDirectory

    return SharedDirectory(os.path.join(folder, "results"))

"""The Ray executor: tensor tasks as Ray tasks over a cluster, bytes through shared storage.

The driver sends `Job`s (tensor tasks with their inputs named by path) in groups, one Ray
task per group, and gets back a `JobResult` per job; what runs on the nodes is
`mbuild.ray_workers`. A job of the target being built writes its bytes at their place in
the output's shard on shared storage (the header is planned ahead), so the driver only
records digests; a job started ahead, for a target whose turn has not come, leaves its bytes
in the results storage, where the driver takes them when the target is built. Outputs, the
manifest, the lock and the publish are therefore those of a local build.

A group is consecutive jobs of one target, up to `GROUP_BYTES` of output or `GROUP_JOBS`
jobs: Ray's cost per task then stays small beside the arithmetic (a 7B model's small norms
travel together; its large matrices one per task). A group's task asks for one CPU and the
memory of its largest job (its jobs run one after the other), and a GPU with --device cuda.

Ray retries a task whose worker or node died (`max_retries`); a job's write is atomic, so
a retried or duplicated job leaves one whole result. A job killed with its driver leaves
its finished results in the storage, where the next run finds them.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

from mbuild import ray_workers
from mbuild.errors import BuildError, MbuildError
from mbuild.executors import Done, Job, JobResult, Work
from mbuild.storage import Storage

# Ray tasks of the cluster in flight at once, per CPU of the cluster (bounds storage in use).
IN_FLIGHT_PER_CPU = 4
# Ray retries a task this many times when its worker or node dies.
RETRIES = 4
# A group of jobs (one Ray task) holds at most this many output bytes, or this many jobs.
GROUP_BYTES = 32 * 2**20
GROUP_JOBS = 16


class RayExecutor:
    """Tensor tasks on a Ray cluster: `Job`s out, `JobResult`s back, bytes through `storage`."""

    runs_elsewhere = True

    def __init__(self, storage: Storage, address: str | None = None, device: str = "cpu", compute: bool = True):
        """Connect to the cluster; with ``compute``, start this run's workers too (not for a dry run)."""
        try:
            import ray
        except ImportError:
            raise MbuildError("--executor ray needs Ray: pip install 'mbuild[ray]'") from None
        self.ray = ray
        self.storage = storage
        self.device = device
        self.keep_warm = ray_workers.keep_warm_seconds()
        # Whether CPU jobs compute in the nodes' warm workers (else each task computes its own).
        self.warm = self.keep_warm > 0 and device == "cpu"
        self._started_here = False
        if not ray.is_initialized():
            self._connect(address)
        self.driver_node = ray.get_runtime_context().get_node_id()
        self._compute = ray.remote(ray_workers.compute_jobs)
        self._relay = ray.remote(ray_workers.relay_jobs)
        self.pending: dict[str, Any] = {}  # key -> ObjectRef of the group, started ahead, that computes it
        self.early: dict[str, JobResult] = {}  # key -> a job started ahead, done before its task came
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.in_flight = max(2, IN_FLIGHT_PER_CPU * cpus)
        self._warming: list = []
        self._looked = 0.0  # when the warm-up was last looked at
        # Until this run's workers have started (Ray gives each driver its own), the driver
        # computes tasks one at a time, as a local build with -j 1 would, unless told not to
        # (MBUILD_RAY_DRIVER_TASKS=0): by its node's warm worker if there is one, else itself,
        # importing torch.
        self._ready = os.environ.get("MBUILD_RAY_DRIVER_TASKS", "1") == "0" or not compute
        self.beside = None if self._ready else self._warm_here()
        self.computes_here = not self._ready and self.beside is None
        if not self._ready:
            # Ray starts as many workers as the node has CPUs when a driver connects; one task
            # tells when they are up (and has the node's warm worker started if it has none).
            # One, not one per CPU: tasks waiting beyond the workers starting would start more.
            self._warming = [ray.remote(ray_workers.warm_up).options(num_cpus=1).remote(self.keep_warm)]

    def _warm_here(self):
        """The driver's node's warm worker for the mbuild installed here, or None."""
        if not self.warm:
            return None
        try:
            return self.ray.get_actor(ray_workers.warm_name(self.driver_node), namespace=ray_workers.NAMESPACE)
        except ValueError:
            return None

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

    def _submit(self, jobs: list[Job]):
        """Start one Ray task for a group of jobs; its ObjectRef (a list of `JobResult`s)."""
        options: dict[str, Any] = {"memory": max(1, max(job.memory for job in jobs)), "max_retries": RETRIES,
                                   "num_cpus": 1}
        if self.device.startswith("cuda"):
            options["num_gpus"] = 1
        if not self.warm:  # the task computes its jobs itself
            return self._compute.options(**options).remote(jobs, self.storage)
        return self._relay.options(**options).remote(self.ray.cloudpickle.dumps(jobs), self.storage, self.keep_warm)

    def prefetch(self, jobs: Iterable[Job]) -> None:
        fresh: dict[str, Job] = {}
        for job in jobs:
            if job.key not in self.pending and job.key not in self.early:
                fresh.setdefault(job.key, job)
        for group in _groups(list(fresh.values())):
            ref = self._submit(group)
            for job in group:
                self.pending[job.key] = ref

    def run(self, tasks: Iterable[Any], work: Work, done: Done) -> None:
        waiting: dict[Any, dict[str, list]] = {}  # ObjectRef -> key -> the tasks its job serves
        group: dict[str, tuple[Job, list]] = {}  # key -> job and tasks, not sent yet
        group_bytes = 0

        def send() -> None:
            nonlocal group_bytes
            if group:
                ref = self._submit([job for job, _ in group.values()])
                waiting[ref] = {key: tasks for key, (_, tasks) in group.items()}
                group.clear()
                group_bytes = 0

        for task in tasks:
            outcome = work.settle(task)
            if outcome is not None:
                done(outcome, None)
                continue
            job = work.job(task)
            if job is None:
                done(work.run(task), self.driver_node)
                continue
            result = self.early.pop(job.key, None)
            if result is not None:  # started ahead, and done
                self._take(result, [task], work, done)
                continue
            ref = next((r for r, keys in waiting.items() if job.key in keys), None) or self.pending.get(job.key)
            if ref is not None:  # a twin of a job sent (a repeated layer), or a job started ahead
                waiting.setdefault(ref, {}).setdefault(job.key, []).append(task)
                continue
            if job.key in group:
                group[job.key][1].append(task)
                continue
            if not self._workers_ready():
                self._compute_beside(task, job, work, done)
                continue
            group[job.key] = (job, [task])
            group_bytes += job.task.nbytes
            if _full(group_bytes, len(group)):
                send()
                if len(waiting) >= self.in_flight:
                    self._collect(waiting, work, done)
        send()
        while waiting:
            self._collect(waiting, work, done)

    def _compute_beside(self, task, job: Job, work: Work, done: Done) -> None:
        """Compute a task for the driver: by its node's warm worker, else here."""
        if self.beside is not None:
            try:
                blob = self.ray.cloudpickle.dumps([job])
                results = self.ray.get(self.beside.compute.remote(blob, self.storage, self.keep_warm))
            except self.ray.exceptions.RayActorError:  # exited meanwhile: the driver computes from now on
                self.beside = None
            except self.ray.exceptions.RayTaskError as error:
                if not isinstance(getattr(error, "cause", None), ray_workers.WarmWorkerClosed):
                    self._raise(error, [task])
                self.beside = None
            else:
                self._take(results[0], [task], work, done)
                return
        done(work.run(task), self.driver_node)

    def _workers_ready(self) -> bool:
        """Whether the workers' warm-up is over (looked at every 0.1 s at most: a look costs milliseconds)."""
        if not self._ready and time.monotonic() - self._looked > 0.1:
            self._looked = time.monotonic()
            self._ready = not self.ray.wait(self._warming, num_returns=len(self._warming), timeout=0)[1]
        return self._ready

    def _collect(self, waiting: dict, work: Work, done: Done) -> None:
        """Wait for one group, then take every other that is done too (a wait costs milliseconds)."""
        refs = list(waiting)
        ready, rest = self.ray.wait(refs, num_returns=1)
        if rest:
            ready += self.ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            served = waiting.pop(ref)
            for result in self._results(ref, [task for tasks in served.values() for task in tasks]):
                self.pending.pop(result.key, None)
                tasks = served.get(result.key)
                if tasks:
                    self._take(result, tasks, work, done)
                else:  # started ahead for a task still to come
                    self.early[result.key] = result

    def _take(self, result: JobResult, tasks: list, work: Work, done: Done) -> None:
        """Take a job's result into the output for each task it serves."""
        if result.written:
            done(work.written(tasks[0], result.digest), result.node)
            for task in tasks[1:]:  # a twin: from the cache, as locally
                done(work.run(task), self.driver_node)
            return
        for index, task in enumerate(tasks):
            data = self.storage.read(result.key, result.digest)
            if data is None:  # gone or damaged since (a gc, a disk fault): computed here instead
                done(work.run(task), self.driver_node)
                continue
            # A repeated layer's twin shares its job: computed once, reused after.
            done(work.accept(task, data, result.digest, result.computed and index == 0), result.node)
        # In the output's shard and the tensor cache now: the storage's copy has served.
        self.storage.delete(result.key)

    def _results(self, ref, tasks: list) -> list[JobResult]:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as error:
            self._raise(error, tasks)
        except RayError as error:
            lost = "was lost" if len(tasks) == 1 else "were lost"
            raise BuildError(f"{_named(tasks)} {lost} on the Ray cluster ({type(error).__name__}): {error}") from None

    @staticmethod
    def _raise(error, tasks: list):
        """A group's failure as the build's error: mbuild's own as it is, any other naming the tensors."""
        cause = getattr(error, "cause", None)
        if isinstance(cause, MbuildError):
            raise cause from None
        raise BuildError(f"{_named(tasks)} failed on the Ray cluster: {cause or error}") from None

    def close(self) -> None:
        self._cancel()
        if self._started_here:
            self.ray.shutdown()

    def _cancel(self) -> None:
        for ref in [*set(self.pending.values()), *self._warming]:
            self.ray.cancel(ref)
        self.pending.clear()
        self._warming = []


def _groups(jobs: list[Job]) -> list[list[Job]]:
    """Consecutive jobs in groups of up to `GROUP_BYTES` of output or `GROUP_JOBS` jobs."""
    groups: list[list[Job]] = []
    size = 0
    for job in jobs:
        if not groups or _full(size, len(groups[-1])):
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += job.task.nbytes
    return groups


def _full(size: int, count: int) -> bool:
    """Whether a group of ``count`` jobs making ``size`` output bytes takes no more."""
    return size >= GROUP_BYTES or count >= GROUP_JOBS


def _named(tasks: list) -> str:
    """"tensor 'NAME'", or "tensors 'NAME' and N more"."""
    if len(tasks) == 1:
        return f"tensor '{tasks[0].name}'"
    return f"tensors '{tasks[0].name}' and {len(tasks) - 1} more"


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

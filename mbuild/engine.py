"""The engine: decides what is stale and streams tensor tasks into output folders.

Each stale target is built into a temporary folder beside its output: tensors are
read lazily, merged in the compute dtype on the chosen device, cast, and written
straight into pre-laid-out shards; config, tokenizer and model card follow, the
manifest is written last, and the folder is renamed into place. A tensor whose
key matches the previous output's is copied from it instead of recomputed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from mbuild import io, lock, methods
from mbuild.cache import State, TensorCache
from mbuild.errors import BuildError, Location, MbuildError
from mbuild.methods import NonFiniteResult
from mbuild.plan import node_of as plan_node
from mbuild.plan import Plan, TargetPlan, TensorTask
from mbuild.staleness import Decision, OutputState, decide_target, inspect_output, source_fingerprints

MBUILD_VERSION = "0.1.0"


@dataclass(frozen=True)
class BuildOptions:
    """How to build: rebuild everything, parallel tasks, device, keep going past failures."""

    force: bool = False
    jobs: int = 1
    device: str = "cpu"
    keep_going: bool = False


@dataclass
class TargetReport:
    """What happened to one target."""

    name: str
    status: str  # "built" | "fresh" | "failed" | "skipped"
    reasons: tuple[str, ...] = ()
    tensors_computed: int = 0
    tensors_reused: int = 0
    seconds: float = 0.0
    output: str = ""
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The report as `--json` prints it."""
        data = {
            "status": self.status,
            "tensors_computed": self.tensors_computed,
            "tensors_reused": self.tensors_reused,
            "seconds": round(self.seconds, 3),
            "output": self.output,
            "reasons": list(self.reasons),
        }
        if self.error:
            data["error"] = self.error
        return data


class Reporter:
    """Receives progress; the CLI subclasses it to draw bars or print lines."""

    def target_started(self, name: str, total: int, reasons: tuple[str, ...]) -> None:
        """A target's build begins: ``total`` tensors, for ``reasons``."""

    def tensor_done(self, name: str) -> None:
        """One more tensor of target ``name`` is written."""

    def target_finished(self, report: TargetReport) -> None:
        """A target is done (built, fresh, failed or skipped)."""

    def waiting(self, message: str) -> None:
        """The build waits on another process (a target lock)."""

    def note(self, text: str) -> None:
        """Something the user should know that does not stop the build (a warning)."""


def output_digests(state: State | None, mergefile) -> Callable[[str], str | None]:
    """A lookup task key -> digest of the bytes it produced: the state first, then the
    manifests of the Mergefile's outputs (so a fresh clone with built outputs needs no cache)."""
    from_manifests: dict[str, str] | None = None

    def lookup(key: str) -> str | None:
        nonlocal from_manifests
        found = state.output_digest(key) if state else None
        if found:
            return found
        if from_manifests is None:
            from_manifests = {}
            for target in mergefile.targets.values():
                manifest = io.read_manifest(target.output) or {}
                for entry in manifest.get("tensors", {}).values():
                    if entry.get("key") and entry.get("digest"):
                        from_manifests[entry["key"]] = entry["digest"]
        return from_manifests.get(key)

    return lookup


class Builder:
    """Builds the stale targets of a plan, in order, reporting as it goes.

    After each target it re-plans (``replan``): downstream keys then name the bytes
    just produced, so a rebuild that changed nothing stops the cascade there.
    """

    def __init__(
        self,
        plan: Plan,
        state: State,
        options: BuildOptions,
        reporter: Reporter | None = None,
        cache: TensorCache | None = None,
        replan: Callable[[list[str] | None], Plan] | None = None,
    ):
        self.plan = plan
        self.state = state
        self.options = options
        self.reporter = reporter or Reporter()
        self.cache = cache
        # replan(changed): a new plan, re-expanding what lies downstream of `changed`
        # (None: everything).
        self.replan = replan or (lambda changed: self.plan)
        self._built: list[str] = []
        self.lock_path = lock.lock_path(plan.mergefile.path)

    def _has_tensor(self, key: str) -> bool:
        return self.cache is not None and not self.options.force and self.cache.contains(key)

    def run(self) -> dict[str, TargetReport]:
        """Bring every planned target up to date; returns a report per target."""
        _tune_allocator()
        self._confirm_platform()
        with torch_single_threaded():
            return self._run()

    def _confirm_platform(self) -> None:
        """Refuse to compute if torch's kernels are not those the plan's keys name."""
        from mbuild import compute_platform

        actual = compute_platform.as_torch_sees_it(self.options.device)
        if self.plan.platform and actual != self.plan.platform:
            raise BuildError(
                f"torch computes on {actual} here, but the plan keyed its tensors for {self.plan.platform}; "
                "bytes made here would be stored under the wrong key. Set ATEN_CPU_CAPABILITY to the "
                "class torch uses, and report this mismatch"
            )

    def _run(self) -> dict[str, TargetReport]:
        reports: dict[str, TargetReport] = {}
        failed: set[str] = set()
        stale: set[str] = set()
        for name in self.plan.order:
            target_plan = self.plan.targets[name]
            upstream_failed = [n.split(":", 1)[1] for n in target_plan.input_nodes if n.split(":", 1)[1] in failed]
            if upstream_failed:
                reports[name] = TargetReport(name, "skipped", (f"input {upstream_failed[0]} failed",))
                failed.add(name)
                self.reporter.target_finished(reports[name])
                continue
            with io.target_lock(target_plan.target.output, self.reporter.waiting) as held:
                # Re-plan only when something changed since the last plan: a target built
                # here (downstream keys may now name its bytes) or one we waited for.
                if held.waited:
                    self.plan = self.replan(None)  # another process built things: plan afresh
                elif self._built:
                    self.plan = self.replan(self._built)
                self._built = []
                target_plan = self.plan.targets[name]
                lock_data = lock.read(self.lock_path)
                fingerprints = source_fingerprints(self.plan, self.state)
                decision = decide_target(
                    self.plan, name, lock_data, fingerprints, stale, self.options.force, self._has_tensor
                )
                if not decision.stale:
                    reports[name] = TargetReport(
                        name, "fresh", (), 0, len(target_plan.tasks), 0.0, str(target_plan.target.output)
                    )
                    lock.repair_lock(self.plan, self.state, [name], self.reporter.note)
                    self.reporter.target_finished(reports[name])
                    continue
                stale.add(name)
                try:
                    reports[name] = self.build_target(target_plan, decision)
                    self._built.append(name)
                except MbuildError as error:
                    if error.location is None:
                        error.location = Location(self.plan.mergefile.path, None, name)
                    if not self.options.keep_going:
                        raise
                    failed.add(name)
                    reports[name] = TargetReport(name, "failed", decision.reasons, error=str(error))
                    self.reporter.target_finished(reports[name])
        return reports

    def build_target(self, target_plan: TargetPlan, decision: Decision) -> TargetReport:
        """Build one target into a temporary folder and move it into place."""
        try:
            return self._build_target(target_plan, decision)
        except OSError as error:  # a full or read-only disk: one message, not a traceback
            raise _disk_fault(error, target_plan.target.output) from None

    def _build_target(self, target_plan: TargetPlan, decision: Decision) -> TargetReport:
        started = time.perf_counter()
        target = target_plan.target
        output = target.output
        output.parent.mkdir(parents=True, exist_ok=True)
        io.recover(output)
        if output.is_symlink() or (output.exists() and not output.is_dir()):
            raise BuildError(
                f"output {output} is not a folder: mbuild never replaces it; choose another 'output:'",
                target.location("output"),
            )
        existing = inspect_output(output)
        if existing.foreign:
            raise BuildError(
                existing.refusal(output) + "; move it away or choose another 'output:'", target.location("output")
            )
        temporary = io.fresh_temporary(output)
        self.reporter.target_started(target.name, len(target_plan.tasks), decision.reasons)
        try:
            counts = self._write_tensors(target_plan, temporary, existing)
            self._write_companions(target_plan, temporary)
            _write_manifest(target_plan, temporary, counts["digests"], counts["shards"])
            io.fsync_folder(temporary)
            io.publish(temporary, output)
        except BaseException:
            io.discard(temporary)
            raise
        finally:
            if self.cache is not None:
                self.cache.prune()  # blobs the new output superseded, or a failed build left empty
        self._record(target_plan, output)
        report = TargetReport(
            target.name,
            "built",
            decision.reasons,
            counts["computed"],
            counts["reused"],
            time.perf_counter() - started,
            str(output),
        )
        self.reporter.target_finished(report)
        return report

    def _input_models(self, target_plan: TargetPlan) -> dict[str, io.ModelInfo]:
        models = {}
        for node in target_plan.input_nodes:
            if node.startswith("target:"):
                upstream = self.plan.mergefile.targets[node.split(":", 1)[1]]
                models[node] = io.read_model(upstream.output)
            else:
                models[node] = self.plan.sources[node].info
        return models

    def _write_tensors(self, target_plan: TargetPlan, folder: Path, existing: OutputState) -> dict[str, Any]:
        import torch

        models = self._input_models(target_plan)
        previous: dict[str, Mapping[str, str]] = {}
        previous_model = None
        if existing.manifest and not self.options.force and not existing.changes:
            previous = existing.manifest.get("tensors", {})
            previous_model = io.read_model(target_plan.target.output)
        writer = io.ShardedWriter(
            folder, [(t.name, t.dtype, t.shape) for t in target_plan.tasks], target_plan.shard_bytes
        )
        reader = io.TensorReader()
        device = torch.device(self.options.device)
        counts = {"computed": 0, "reused": 0}

        cache = None if self.options.force else self.cache
        made: dict[str, str] = {}  # task key -> digest of the bytes it produced

        # Shards shared with the cache as they are written: a computed tensor's bytes
        # then exist once on disk, and caching one costs a row, not a second write.
        blobs: dict[str, str] = {}
        shares = self.cache is not None and any(t.key and t.method != "concat" for t in target_plan.tasks)

        def keep(task: TensorTask, digest: str, data=None) -> None:
            """Cache a task's bytes: their place in a linked shard, else (when given) a copy."""
            if self.cache is None or not task.key:
                return
            slot = writer.slots[task.name]
            blob = blobs.get(slot.file)
            if blob is not None:
                self.cache.put_at(task.key, blob, slot.start, slot.end - slot.start, digest)
            elif data is not None:
                self.cache.put(task.key, data, digest)

        gates = None
        if any(t.method == "moe_gate" for t in target_plan.tasks):
            from mbuild import moe

            base_node = plan_node(target_plan.target.base_model)
            base_folder = models[base_node].folder
            gates = moe.GateContext(device)

        # Workers run side by side, each task splitting its own work between its share of
        # the cores where the split cannot change a byte (see torch_single_threaded).
        threads_per_task = max(1, usable_cores() // max(1, self.options.jobs))
        inflight: dict[str, threading.Event] = {}
        inflight_lock = threading.Lock()

        def run(task: TensorTask) -> str:
            """Run a task once per key: a twin (a repeated layer) waits and then reads the cache."""
            if cache is None or not task.key or task.method == "concat":
                return run_once(task)
            with inflight_lock:
                event = inflight.get(task.key)
                if event is None:
                    inflight[task.key] = threading.Event()
            if event is not None:
                event.wait()
                return run_once(task)
            try:
                return run_once(task)
            finally:
                inflight[task.key].set()

        def run_once(task: TensorTask) -> str:
            old = previous.get(task.name)
            if task.method == "concat":
                # Stacked expert tensors can be huge: streamed in pieces, never cached whole.
                if previous_model is not None and old and task.key and old.get("key") == task.key:
                    digest = _copy_streamed(reader, previous_model.tensors[task.name], writer, task.name)
                    if digest == old.get("digest"):
                        made[task.key] = digest
                        return "reused"
                from mbuild import moe

                digest = moe.stream_concat(task, models, reader, writer)
                if task.key:
                    made[task.key] = digest
                return "computed"
            if cache is not None and task.key:
                found = cache.get(task.key)
                if found is not None:
                    made[task.key] = writer.write(task.name, found[0], found[1])
                    keep(task, found[1])  # the new shard's copy now serves, and the old blob can go
                    return "reused"
            if previous_model is not None and old and task.key and old.get("key") == task.key:
                data = _raw_bytes(reader.read(previous_model.tensors[task.name]))
                digest = io.bytes_digest(data)
                if digest == old.get("digest"):
                    made[task.key] = writer.write(task.name, data, digest)  # verified: not hashed again
                    keep(task, digest)
                    return "reused"
            if task.method == "moe_gate":
                from mbuild import moe

                result = moe.compute_gate(task, models, reader, gates, base_folder).to(io.torch_dtype(task.dtype))
            else:
                result = compute_task(
                    task, models, reader, device, target_plan.target, target_plan.vocabulary, threads_per_task
                )
            data = _raw_bytes(result)
            digest = writer.write(task.name, data)
            if task.key:
                made[task.key] = digest
                # Committed as soon as computed: a killed build resumes from here.
                keep(task, digest, data)
            return "computed"

        try:
            for file in writer.shards if shares else ():
                blob = self.cache.link(folder / file)
                if blob is not None:
                    blobs[file] = blob
            jobs = max(1, self.options.jobs)
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                pending: set[concurrent.futures.Future] = set()
                for task in target_plan.tasks:
                    pending.add(pool.submit(run, task))
                    # A bounded window keeps memory at a few tensors per worker.
                    while len(pending) >= 2 * jobs:
                        pending = self._collect(pending, counts, target_plan.name)
                while pending:
                    pending = self._collect(pending, counts, target_plan.name)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            reader.close()
            self.state.remember_outputs(made)
            if blobs:
                self.cache.done_with(blobs.values())
        counts["digests"] = dict(writer.digests)
        counts["shards"] = {name: slot.file for name, slot in writer.slots.items()}
        return counts

    def _collect(self, pending, counts, name):
        done, rest = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            counts[future.result()] += 1
            self.reporter.tensor_done(name)
        return rest

    def _write_companions(self, target_plan: TargetPlan, folder: Path) -> None:
        io.write_companions(folder, target_plan.files, target_plan.config, target_plan.card)

    def _record(self, target_plan: TargetPlan, output: Path) -> None:
        """Update Mergefile.lock with what this target was built from."""
        lock.record_in_lock(self.plan, self.state, [target_plan.name])


def _disk_fault(error: OSError, output: Path) -> BuildError:
    """An OS error met while building ``output`` as one message; for a full disk, what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return BuildError(
            f"cannot build {output}: {error.strerror}; free some space there and run mbuild again "
            "(earlier outputs are intact)"
        )
    return BuildError(f"cannot build {output}: {error.filename or output}: {error.strerror}")


def compute_task(
    task: TensorTask,
    models: Mapping[str, io.ModelInfo],
    reader: io.TensorReader,
    device,
    target,
    vocabulary=None,
    threads: int = 1,
):
    """Read a task's inputs, run its method in the compute dtype, and cast to the output dtype.

    ``threads``: how many threads the task may split its work between where the split does
    not change the bytes (slices of an element-wise method, a threaded kernel's own parts).
    """
    import torch

    tensors = []
    for item in task.inputs:
        info = models[item.node].tensors.get(item.name)
        if info is None:
            raise BuildError(f"input '{item.node.split(':', 1)[1]}' has no tensor '{item.name}'")
        tensors.append(reader.read(info))
    if task.method == "copy":
        return tensors[0]
    compute_dtype = io.torch_dtype(task.compute_dtype)
    method = methods.get(task.method)
    options = {
        "base_index": task.base_index,
        "params": dict(task.params),
        "model_params": [dict(p) for p in task.model_params],
    }
    same_shape = all(t.shape == tensors[0].shape for t in tensors)
    if method.elementwise and same_shape and not task.vocabulary and torch.device(device).type == "cpu":
        return _compute_in_slices(task, method, tensors, compute_dtype, options, target, threads)
    if method.threaded:
        options["threads"] = threads if torch.device(device).type == "cpu" else 1
    if method.stored_inputs:
        options["dtype"] = compute_dtype
    # Aligning vocabularies works on whole tensors in the compute dtype.
    convert = not method.stored_inputs or task.vocabulary
    inputs = [t.to(device=device, dtype=compute_dtype if convert else None) for t in tensors]
    del tensors
    if task.vocabulary:
        from mbuild import vocabulary as vocabularies

        inputs = vocabularies.align(inputs, [i.node for i in task.inputs], vocabulary)
    generator = None
    if task.seed is not None:
        # Drawn on the CPU whatever the device, so the bytes do not depend on it.
        generator = torch.Generator("cpu").manual_seed(tensor_seed(task.seed, task.name))
    if method.casts_output:
        options["out_dtype"] = io.torch_dtype(task.dtype)
    try:
        result = method.kernel(inputs, generator=generator, **options)
        if not method.casts_output:  # one that casts checked its values as it went
            methods.require_finite(result)
    except NonFiniteResult:
        raise _non_finite(task, target) from None
    del inputs
    return result.to(dtype=io.torch_dtype(task.dtype)).cpu()


# Elements per slice of an element-wise method: 1 MiB per float32 input, so a slice's
# conversions and temporaries stay in cache instead of being tensor-sized buffers.
ELEMENTWISE_SLICE = 1 << 18


def _compute_in_slices(task: TensorTask, method, tensors, compute_dtype, options, target, threads: int = 1):
    """An element-wise method run a slice at a time, each written into the output as it is done.

    Only a slice of each input is ever converted to the compute dtype, so memory is the
    inputs as stored plus the output; per element the operations, and so the bytes, are
    those of the whole-tensor run, whichever of ``threads`` threads runs a slice. A method's
    compiled one-pass form, where it applies, does the same in one pass.
    """
    import torch

    output = torch.empty(tensors[0].shape, dtype=io.torch_dtype(task.dtype))
    try:
        if method.one_pass is not None and method.one_pass(
            [t.contiguous() for t in tensors], output, compute_dtype=compute_dtype, threads=threads, **options
        ):
            return output
        flat_output = output.view(-1)
        flat_inputs = [t.reshape(-1) for t in tensors]

        def run_slice(start: int) -> None:
            stop = start + ELEMENTWISE_SLICE
            result = method.kernel([t[start:stop].to(compute_dtype) for t in flat_inputs], generator=None, **options)
            methods.require_finite(result)
            flat_output[start:stop] = result

        methods.map_in_threads(run_slice, range(0, flat_output.numel(), ELEMENTWISE_SLICE), threads)
    except NonFiniteResult:
        raise _non_finite(task, target) from None
    return output


def _non_finite(task: TensorTask, target) -> BuildError:
    """A clear error for NaN or inf in a method's result (they would poison every later merge)."""
    return BuildError(f"tensor '{task.name}' has non-finite values (NaN or inf) after {task.method}", target.location())


def usable_cores() -> int:
    """The cores this process may run on (its affinity: `taskset` counts), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_single_threaded():
    """Torch's own intra-op threads set to one for the block, then restored.

    Torch splits a reduction (a norm, a dot product) and some vectorised loops between its
    threads once a tensor passes its grain (32768 elements), and the rounding follows the
    split: the bytes would change with the thread count, the core count and the environment
    (OMP_NUM_THREADS). With one thread they are those of mergekit run single-threaded on any
    machine. Parallelism comes from tasks run side by side (-j) and, inside a task, from
    splits that cannot change a byte (element-wise slices, the C loops' parts, SLERP's
    fixed chunks). Worker threads started inside the block take the setting when they
    first run torch.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tune_allocator() -> None:
    """Apply `mbuild.__main__.ALLOCATOR_TUNABLES` at run time, unless the environment set them.

    A fixed 32 MiB mmap threshold and two heaps at most: buffers of that size are recycled
    rather than faulted in afresh, and freed memory is not kept in one heap per thread.
    """
    import ctypes
    import ctypes.util

    from mbuild.__main__ import ARENA_MAX, MMAP_THRESHOLD, TRIM_THRESHOLD

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


def _copy_streamed(reader: io.TensorReader, info: io.TensorInfo, writer: io.ShardedWriter, name: str) -> str:
    """Copy one stored tensor's bytes in chunks into the writer's slot; returns their digest."""
    digest = io.bytes_hasher()
    offset = 0
    for chunk in reader.chunks(info):
        writer.write_part(name, offset, chunk)
        digest.update(chunk)
        offset += len(chunk)
    return writer.finish(name, digest.hexdigest())


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A per-tensor seed from the target's seed and the tensor's name: order-independent."""
    material = hashlib.sha256(f"{seed}\0{tensor_name}".encode()).digest()
    return int.from_bytes(material[:8], "little") & (2**63 - 1)


def _raw_bytes(tensor) -> memoryview:
    import torch

    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _write_manifest(
    target_plan: TargetPlan, folder: Path, digests: Mapping[str, str], shard_of: Mapping[str, str]
) -> None:
    """The completion marker, written last: key, per-tensor keys and digests, file stats."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != io.MANIFEST_NAME:
            stat = path.stat()
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if not path.name.endswith(".safetensors"):
                entry["sha256"] = io.hash_file(path)
            files[path.name] = entry
    # A shard's digest is the digest of its tensors' digests in order: computed while
    # writing, so the shard is never read back.
    for name, entry in files.items():
        if name.endswith(".safetensors"):
            in_shard = [t.name for t in target_plan.tasks if shard_of[t.name] == name]
            entry["digest"] = io.bytes_digest("".join(digests[t] for t in in_shard).encode())
    manifest = {
        "mbuild": MBUILD_VERSION,
        "target": target_plan.name,
        "key": target_plan.key,
        "tensors": {t.name: _tensor_record(t, digests[t.name]) for t in target_plan.tasks},
        "files": files,
    }
    io.write_json(folder / io.MANIFEST_NAME, manifest)


def _tensor_record(task: TensorTask, digest: str) -> dict[str, Any]:
    """What the manifest keeps per tensor: enough for reuse, and for `mbuild explain` to diff."""
    return {
        "key": task.key,
        "digest": digest,
        "method": task.method,
        "params": dict(task.params),
        "model_params": [dict(p) for p in task.model_params],
        "inputs": [f"{i.node.split(':', 1)[1]}:{i.name}" for i in task.inputs],
        "input_keys": [i.key for i in task.inputs],
        "dtype": task.dtype,
        "compute_dtype": task.compute_dtype,
    }

"""The engine: decides what is stale and streams tensor tasks into output folders.

Each stale target is built into a temporary folder beside its output: tensors are
read lazily, merged in the compute dtype on the chosen device, cast, and written
straight into pre-laid-out shards; config, tokenizer and model card follow, the
manifest is written last, and the folder is renamed into place. A tensor whose
key matches the previous output's is copied from it instead of recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mbuild import io, keys, launcher, lock, manifest, memory, operations
from mbuild.cache import State, TensorCache
from mbuild.errors import BuildError, Location, MbuildError
from mbuild.executors import Executor, Job, LocalExecutor
from mbuild.nodes import Node
from mbuild.plan import node_of as plan_node
from mbuild.plan import Plan, TargetPlan, TensorTask
from mbuild.staleness import (
    Decision,
    OutputState,
    decide_all,
    decide_target,
    inspect_output,
    reusable_in,
    source_fingerprints,
    task_memory,
)

# The one weights file of an output format written unsharded.
SINGLE_FILES = {"peft": "adapter_model.safetensors", "eval": "score.safetensors"}


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
    nodes: dict[str, int] = field(default_factory=dict)  # cluster node -> tasks run there

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
        if self.nodes:
            data["nodes"] = dict(self.nodes)
        return data


class Reporter:
    """Receives progress; the CLI subclasses it to draw bars or print lines."""

    def target_started(self, name: str, total: int, reasons: tuple[str, ...]) -> None:
        """A target's build begins: ``total`` tensors, for ``reasons``."""

    def tensor_done(self, name: str, node: str | None = None) -> None:
        """One more tensor of target ``name`` is written; ``node``: the cluster node that computed it."""

    def target_finished(self, report: TargetReport) -> None:
        """A target is done (built, fresh, failed or skipped)."""

    def waiting(self, message: str) -> None:
        """The build waits on another process (a target lock)."""

    def note(self, text: str) -> None:
        """Something the user may want to know (a record repaired)."""

    def warn(self, text: str) -> None:
        """Something the user must know that does not stop the build (input tensors left out)."""

    @contextlib.contextmanager
    def step(self, description: str, total: int):
        """A long step measured in bytes (hashing a source); yields a function told of progress."""
        yield lambda count: None

    def running(self, targets: int):
        """A context for the build of ``targets`` targets (the CLI draws its bars inside it)."""
        return contextlib.nullcontext()


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
        executor: Executor | None = None,
    ):
        self.plan = plan
        self.executor = executor or LocalExecutor(options.jobs)
        self.state = state
        self.options = options
        self.reporter = reporter or Reporter()
        self.cache = cache
        # replan(changed): a new plan, re-expanding what lies downstream of `changed`
        # (None: everything).
        self.replan = replan or (lambda changed: self.plan)
        self._built: list[str] = []
        self.lock_path = lock.lock_path(plan.mergefile.path)
        self.streaming = larger_than_memory(plan)
        self._setup_lock = threading.Lock()
        self._ready = False  # ready_to_compute has run

    def _has_tensor(self, key: str) -> bool:
        return self.cache is not None and not self.options.force and self.cache.contains(key)

    def run(self) -> dict[str, TargetReport]:
        """Bring every planned target up to date; returns a report per target."""
        launcher.tune_allocator()
        with contextlib.ExitStack() as self._compute_setup:
            if not self.executor.runs_elsewhere:
                self.ready_to_compute()
            self._start_jobs()
            return self._run()

    def ready_to_compute(self) -> None:
        """Before this process computes its first tensor: torch's kernels checked against the
        plan's platform, and torch single-threaded until the run ends.

        A local build does this first. A cluster's driver does it only if it computes a tensor
        itself, so a driver whose workers compute everything never imports torch.
        """
        with self._setup_lock:
            if self._ready:
                return
            self._confirm_platform()
            self._compute_setup.enter_context(torch_single_threaded())
            self._ready = True

    def _start_jobs(self, after: str | None = None) -> None:
        """Give the executor the jobs of the stale targets whose inputs are final, to start now.

        A target whose inputs are all sources or fresh targets has its final keys already, so
        a cluster computes it while the targets before it are still being assembled. Only the
        targets ``after`` the one just built count, less the next (its tasks are run as it is built).
        """
        if not self.executor.runs_elsewhere:
            return
        decisions = decide_all(self.plan, self.state, self.options.force, self._has_tensor)
        stale = {name for name, decision in decisions.items() if decision.stale}
        jobs = []
        order = list(self.plan.order)
        later = order[order.index(after) + 1 :] if after in order else order
        following = [name for name in later if name in stale][1:]
        for name in following:
            target_plan = self.plan.targets[name]
            upstream = [Node(n).label for n in target_plan.input_nodes if Node(n).is_target]
            if any(label in stale for label in upstream):
                continue
            reusable = reusable_in(inspect_output(target_plan.target.output), self._has_tensor)
            models = self._input_models(target_plan)
            for task in target_plan.tasks:
                if task.key and not task.pending and not reusable(task):
                    job = self._job(task, models, target_plan)
                    if job is not None:
                        jobs.append(job)
        self.executor.prefetch(jobs)

    def _job(self, task: TensorTask, models, target_plan: TargetPlan) -> Job | None:
        """A task as a job for another machine: only the input tensors it reads, named by path."""
        if not operations.portable(task) or not task.key:
            return None
        needed: dict[str, dict[str, io.TensorInfo]] = {}
        for item in task.inputs:
            info = models[item.node].tensors.get(item.name)
            if info is None or info.file is None:
                return None  # the engine reports it when the task runs here
            needed.setdefault(item.node, {})[item.name] = info
        return make_job(task, target_plan, self.options.device, self.plan.platform, needed)

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
            upstream_failed = [Node(n).label for n in target_plan.input_nodes if Node(n).label in failed]
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
                    if self.executor.runs_elsewhere and self.plan.order[-1] != name:
                        self.plan = self.replan(self._built)  # the next targets' keys are final now
                        self._built = []
                        self._start_jobs(after=name)
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
            target_plan = counts["plan"]  # with every key, if its sources were hashed as they were read
            self._write_companions(target_plan, temporary)
            manifest.write(target_plan, temporary, counts["digests"], counts["shards"])
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
            nodes=counts["nodes"],
        )
        self.reporter.target_finished(report)
        return report

    def _input_models(self, target_plan: TargetPlan) -> dict[str, io.ModelInfo]:
        models = {}
        for node in target_plan.input_nodes:
            if Node(node).is_target:
                upstream = self.plan.mergefile.targets[Node(node).label]
                models[node] = io.read_model(upstream.output)
            else:
                models[node] = self.plan.sources[node].info
        return models

    def _write_tensors(self, target_plan: TargetPlan, folder: Path, existing: OutputState) -> dict[str, Any]:
        pipeline = _TensorPipeline(self, target_plan, folder, existing)
        counts: dict[str, Any] = {"computed": 0, "reused": 0, "nodes": {}}

        def done(outcome: str, node: str | None) -> None:
            counts[outcome] += 1
            if node is not None and outcome == "computed":
                counts["nodes"][node] = counts["nodes"].get(node, 0) + 1
            self.reporter.tensor_done(target_plan.name, node)

        try:
            pipeline.share_shards()
            self.executor.run(target_plan.tasks, pipeline, done)
            pipeline.writer.close()
            if pipeline.reader.hashing:
                target_plan = self._hashed_while_read(target_plan, pipeline)
        except BaseException:
            pipeline.writer.abort()
            raise
        finally:
            pipeline.close()
        counts["plan"] = target_plan
        counts["digests"] = dict(pipeline.writer.digests)
        counts["shards"] = {name: slot.file for name, slot in pipeline.writer.slots.items()}
        return counts

    def _hashed_while_read(self, target_plan: TargetPlan, pipeline: "_TensorPipeline") -> TargetPlan:
        """Remember the digests of sources first read by this build, and key its tasks with them.

        A source never seen before cannot have cached results below it, so it was not hashed
        first: each tensor was hashed by the read that computed with it. Tensors no task read
        are read once now; then the plan is made again (no source is read for it) and the
        target's tensors, already written, are recorded and cached under their keys.
        """
        for file, identity in pipeline.identities.items():
            found = dict(pipeline.reader.digests.get(file, {}))
            unread = [info for info in pipeline.file_tensors[file] if info.name not in found]
            found.update(io.hash_tensor_bytes(unread))
            if io.file_identity(file) != identity:
                raise BuildError(f"{file} changed while this build read it; run mbuild again")
            self.state.remember(file, identity, found)
        self.plan = self.replan(None)
        keyed = self.plan.targets[target_plan.name]
        if [(t.name, t.shape, t.dtype) for t in keyed.tasks] != [(t.name, t.shape, t.dtype) for t in target_plan.tasks]:
            raise BuildError(f"the sources of target '{target_plan.name}' changed while it was built; run mbuild again")
        moves = []  # the entries cached under provisional keys, now under the real ones
        for provisional, task in zip(target_plan.tasks, keyed.tasks):
            if task.key:
                pipeline.made[task.key] = pipeline.writer.digests[task.name]
                old = pipeline._provisional(provisional)
                if old:
                    moves.append((old, task.key))
        if pipeline.cache is not None:
            pipeline.cache.rename(moves)
        return keyed

    def _write_companions(self, target_plan: TargetPlan, folder: Path) -> None:
        if target_plan.output_format == "gguf":  # config and tokenizer are inside the .gguf file
            (folder / "README.md").write_text(target_plan.card)
            return
        io.write_companions(folder, target_plan.files, target_plan.config, target_plan.card)

    def _record(self, target_plan: TargetPlan, output: Path) -> None:
        """Update Mergefile.lock with what this target was built from."""
        lock.record_in_lock(self.plan, self.state, [target_plan.name])


class _TensorPipeline:
    """One target's tensors, each from the cheapest source of its bytes, into the writer.

    In order: the tensor cache, the previous output (when the key is unchanged and the bytes
    still hash to the recorded digest), else its operation (`mbuild.operations`). Computed
    bytes are cached as soon as they are written, so a killed build resumes from there.
    """

    def __init__(self, builder: Builder, target_plan: TargetPlan, folder: Path, existing: OutputState):
        self.builder = builder
        self.target_plan = target_plan
        self.cache = builder.cache
        self.state = builder.state
        self.lookup = None if builder.options.force else builder.cache  # reuse from the cache
        self.models = builder._input_models(target_plan)
        self.previous: Mapping[str, Mapping[str, str]] = {}
        self.previous_model = None
        gguf = target_plan.output_format == "gguf"  # one .gguf file (mbuild.io.gguf_file), not shards
        if gguf:
            from mbuild.io import gguf_file
        if existing.manifest and not builder.options.force and not existing.changes:
            self.previous = existing.manifest.get("tensors", {})
            output = target_plan.target.output
            self.previous_model = gguf_file.read_output(output) if gguf else io.read_model(output)
        if gguf:
            self.writer = gguf_file.writer_for(folder, target_plan, builder.streaming)
        else:
            self.writer = io.ShardedWriter(
                folder, [(t.name, t.dtype, t.shape) for t in target_plan.tasks], target_plan.shard_bytes, builder.streaming,
                # A PEFT adapter (`plan.kinds.lora_extraction`) is one adapter_model.safetensors,
                # an eval's score (`plan.kinds.evaluation`) one score.safetensors.
                single=SINGLE_FILES.get(target_plan.output_format, "model.safetensors"),
            )
        # Sources read for the first time: hashed by the reads that compute with them.
        first_read = [builder.plan.sources[n].info for n in target_plan.input_nodes if n in builder.plan.unhashed]
        self.file_tensors: dict[str, list[io.TensorInfo]] = {}
        for info in first_read:
            for tensor in info.tensors.values():
                self.file_tensors.setdefault(tensor.file, []).append(tensor)
        self.identities = {file: io.file_identity(file) for file in self.file_tensors}
        self.reader = io.TensorReader(frozenset(self.file_tensors), streaming=builder.streaming)
        self.position = {task.name: index for index, task in enumerate(target_plan.tasks)}
        self._read_ahead = 0  # tasks before this index have had their inputs asked for
        self._inputs: operations.Inputs | None = None
        self._inputs_lock = threading.Lock()
        self.tasks = target_plan.tasks
        self.folder = folder
        self.made: dict[str, str] = {}  # task key -> digest of the bytes it produced
        self.blobs: dict[str, str] = {}  # shard file -> its blob in the cache
        self._inflight: dict[str, threading.Event] = {}  # task key (or provisional key) -> done
        self._first: dict[str, str] = {}  # the same -> the name of the task that runs it
        self._inflight_lock = threading.Lock()

    def share_shards(self) -> None:
        """Share the shards with the cache as they are written: a computed tensor's bytes
        then exist once on disk, and caching one costs a row, not a second write."""
        keyed = bool(self.reader.hashing)  # keys come once the sources are hashed
        if self.cache is None or not any(
            (t.key or keyed) and not operations.operation(t.method).streams for t in self.tasks
        ):
            return
        for file in self.writer.shards:
            blob = self.cache.link(self.folder / file)
            if blob is not None:
                self.blobs[file] = blob

    def _ask_ahead(self, task: TensorTask) -> None:
        """Streaming: ask the kernel to read the inputs of the next tasks (up to READ_AHEAD bytes)."""
        if not self.reader.streaming:
            return
        with self._inflight_lock:
            ahead, index = 0, self.position[task.name] + 1
            while index < len(self.tasks) and ahead < memory.READ_AHEAD:
                for item in self.tasks[index].inputs:
                    info = self.models[item.node].tensors.get(item.name)
                    if info is not None:
                        if index >= self._read_ahead:
                            self.reader.will_need(info)
                        ahead += info.end - info.start
                index += 1
            self._read_ahead = max(self._read_ahead, index)

    @property
    def inputs(self) -> operations.Inputs:
        """What tasks computed here read from; made (and torch imported) for the first of them."""
        with self._inputs_lock:
            if self._inputs is None:
                self.builder.ready_to_compute()
                self._inputs = self._make_inputs()
            return self._inputs

    def _make_inputs(self) -> operations.Inputs:
        import torch

        builder, target_plan = self.builder, self.target_plan
        device = torch.device(builder.options.device)
        inputs = operations.Inputs(
            self.models,
            self.reader,
            device,
            target_plan.target,
            target_plan.vocabulary,
            # Workers run side by side, each task splitting its own work between its share of
            # the cores where the split cannot change a byte (see torch_single_threaded).
            threads=max(1, usable_cores() // max(1, builder.options.jobs)),
        )
        if any(t.method == "moe_gate" for t in target_plan.tasks):
            from mbuild import moe

            inputs.gates = moe.GateContext(device)
            inputs.base_folder = self.models[plan_node(target_plan.target.base_model)].folder
        return inputs

    def run(self, task: TensorTask) -> str:
        """Run a task once per key: a twin (a repeated layer) waits and then reads the cache.

        A task not keyed yet (its sources are hashed as they are read) finds its twins by its
        provisional key; the second takes the first's bytes from the shard.
        """
        self._ask_ahead(task)
        if operations.operation(task.method).streams or (task.key and self.lookup is None):
            return self._run_once(task)
        twin = task.key or self._provisional(task)
        if twin is None:
            return self._run_once(task)
        with self._inflight_lock:
            event = self._inflight.get(twin)
            if event is None:
                self._inflight[twin] = threading.Event()
                self._first[twin] = task.name
        if event is not None:
            event.wait()
            if not task.key:
                return self._copy_twin(task, self._first[twin])
            return self._run_once(task)
        try:
            return self._run_once(task)
        finally:
            self._inflight[twin].set()

    def _copy_twin(self, task: TensorTask, first: str) -> str:
        """Write the bytes of an equal task written before (a repeated layer, not keyed yet)."""
        digest = self.writer.digests.get(first)
        if digest is None:  # the first one failed: its error is the build's
            return self._run_once(task)
        self.writer.write(task.name, self.writer.read_back(first), digest)
        return "reused"

    def _run_once(self, task: TensorTask) -> str:
        """Write one tensor; returns "reused" or "computed"."""
        operation = operations.operation(task.method)
        if operation.streams:
            return self._streamed(task, operation)
        settled = self.settle(task)
        if settled is not None:
            return settled
        data = io.raw_bytes(operation.compute(task, self.inputs))
        return self.accept(task, data, None, computed=True)

    def job(self, task: TensorTask) -> Job | None:
        """The task as a job another machine can run (None: it runs here), writing its bytes
        straight into their place in this output's shard."""
        job = self.builder._job(task, self.models, self.target_plan)
        if job is None:
            return None
        slot = self.writer.slots[task.name]
        return dataclasses.replace(job, destination=(str(self.folder / slot.file), slot.start, slot.end - slot.start))

    def written(self, task: TensorTask, digest: str) -> str:
        """Take the bytes a job wrote into this task's place in the shard, and cache them."""
        self.writer.finish(task.name, digest)
        if task.key:
            self.made[task.key] = digest
            linked = self.blobs.get(self.writer.slots[task.name].file) is not None
            self._keep(task, digest, None if linked else self.writer.read_back(task.name))
        return "computed"

    def accept(self, task: TensorTask, data, digest: str | None, computed: bool) -> str:
        """Write a task's bytes (computed here, or left in storage by a job) and cache them."""
        digest = self.writer.write(task.name, data, digest)
        if task.key:
            self.made[task.key] = digest
            self._keep(task, digest, data)
        else:  # only as a place in a linked shard: a copy would double the bytes on disk
            self._keep(task, digest, key=self._provisional(task))
        return "computed" if computed else "reused"

    def settle(self, task: TensorTask) -> str | None:
        """Take a task's bytes from the tensor cache or the previous output: "reused", else None."""
        if operations.operation(task.method).streams:
            return None
        if self.lookup is not None and (task.key or self.reader.hashing):
            key = task.key or self._provisional(task)
            found = self.lookup.get(key) if key else None
            if found is not None:
                digest = self.writer.write(task.name, found[0], found[1])
                if task.key:
                    self.made[task.key] = digest
                self._keep(task, found[1], key=key)  # the new shard's copy now serves, and the old blob can go
                return "reused"
        if self._unchanged(task):
            data = io.raw_bytes(self.reader.read(self.previous_model.tensors[task.name]))
            digest = keys.tensor_digest(data)
            if digest == self.previous[task.name].get("digest"):
                self.made[task.key] = self.writer.write(task.name, data, digest)  # verified: not hashed again
                self._keep(task, digest)
                return "reused"
        return None

    def _streamed(self, task: TensorTask, operation: operations.Operation) -> str:
        """A tensor too large to hold (stacked experts): copied or computed in pieces, never cached whole."""
        if self._unchanged(task):
            info = self.previous_model.tensors[task.name]
            digest = operations.copy_streamed(self.reader, info, self.writer, task.name)
            if digest == self.previous[task.name].get("digest"):
                self.made[task.key] = digest
                return "reused"
        digest = operation.stream(task, self.inputs, self.writer)
        if task.key:
            self.made[task.key] = digest
        return "computed"

    def _unchanged(self, task: TensorTask) -> bool:
        """Whether the previous output holds this task's key (its bytes still to be verified)."""
        old = self.previous.get(task.name)
        return self.previous_model is not None and bool(old) and bool(task.key) and old.get("key") == task.key

    def _keep(self, task: TensorTask, digest: str, data=None, key: str | None = None) -> None:
        """Cache a task's bytes (under ``key``, else its own): their place in a linked shard, else
        (when given) a copy."""
        key = key or task.key
        if self.cache is None or not key:
            return
        slot = self.writer.slots[task.name]
        blob = self.blobs.get(slot.file)
        if blob is not None:
            self.cache.put_at(key, blob, slot.start, slot.end - slot.start, digest)
        elif data is not None:
            self.cache.put(key, data, digest)

    def _provisional(self, task: TensorTask) -> str | None:
        """A key for a task whose sources are hashed as they are read, until they are: the task
        and its input files' identities (path, size, mtime, inode), as remembered digests are
        trusted. A first build killed midway resumes from what it cached under these."""
        if task.key or not self.reader.hashing:
            return None
        files = set()
        for item in task.inputs:
            info = self.models[item.node].tensors.get(item.name)
            if info is None or info.file is None:
                return None
            files.add(info.file)
        identities = [(file, self.identities.get(file) or io.file_identity(file)) for file in sorted(files)]
        return keys.text_digest(repr(("provisional", dataclasses.replace(task, name=""), identities)))

    def close(self) -> None:
        """Close the inputs, remember what was made, and let the cache release the shards."""
        self.reader.close()
        self.state.remember_outputs(self.made)
        if self.blobs:
            self.cache.done_with(self.blobs.values())


def make_job(task: TensorTask, target_plan: TargetPlan, device: str, platform: str, models=None) -> Job:
    """A task as a `Job`; ``models`` (node -> name -> TensorInfo) are the tensors it reads."""
    from mbuild import __version__

    return Job(
        task=task,
        models={node: io.ModelInfo(None, {}, tensors) for node, tensors in (models or {}).items()},
        target=target_plan.target,
        vocabulary=target_plan.vocabulary if task.vocabulary else None,
        device=device,
        platform=platform,
        version=__version__,
        memory=task_memory(task),
    )


def largest_job(plan: Plan, names, device: str) -> Job | None:
    """The job of the named targets that needs the most memory (its inputs left unnamed), or None."""
    every = [
        (task_memory(task), task, name)
        for name in names
        for task in plan.targets[name].tasks
        if operations.portable(task)
    ]
    if not every:
        return None
    _, task, name = max(every, key=lambda item: item[0])
    return make_job(task, plan.targets[name], device, plan.platform)


def _disk_fault(error: OSError, output: Path) -> BuildError:
    """An OS error met while building ``output`` as one message; for a full disk, what to do."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return BuildError(
            f"cannot build {output}: {error.strerror}; free some space there and run mbuild again "
            "(earlier outputs are intact)"
        )
    return BuildError(f"cannot build {output}: {error.filename or output}: {error.strerror}")


def larger_than_memory(plan: Plan) -> bool:
    """Whether a build streams: its sources and outputs together exceed the memory available
    (MBUILD_STREAMING=1 or 0 decides instead)."""
    configured = os.environ.get("MBUILD_STREAMING")
    if configured in ("0", "1"):
        return configured == "1"
    total = sum(source.info.nbytes for source in plan.sources.values())
    total += sum(target_plan.nbytes for target_plan in plan.targets.values())
    return total > memory.available_memory()


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

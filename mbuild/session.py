"""A build session: plan, decide, build each stale target, re-plan after each, record.

`mbuild [TARGETS]` runs one; the CLI only parses arguments and prints. The session finds
every mistake the headers show before any source is hashed (a plan over remembered
digests first), answers a no-op without locks or the tensor cache, and otherwise hands the
plan to the engine's `Builder`, which re-plans through `Session.plan` after each target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mbuild import engine, evaluation, executors, lock, memory, plan, staleness
from mbuild.cache import State, TensorCache
from mbuild.lora import Adapters
from mbuild.mergefile import Mergefile
from mbuild.nodes import LORA, Node
from mbuild.pickles import Conversions


@dataclass(frozen=True)
class Request:
    """What the user asked for: which targets, and how to build them."""

    targets: tuple[str, ...] = ()
    force: bool = False
    jobs: int = 2
    device: str = "cpu"
    keep_going: bool = False
    shard_bytes: int = plan.DEFAULT_SHARD_BYTES
    platform: str = ""  # where tasks compute (`compute_platform.identify`)
    allow_pickle: bool = False
    executor: str = "local"  # "local" or "ray"
    ray_address: str | None = None  # None: `auto`, else a Ray of this run's own


class Session:
    """One command's view of a Mergefile: its plans, and the build that brings it up to date."""

    def __init__(
        self,
        mergefile: Mergefile,
        state: State,
        request: Request,
        reporter: engine.Reporter | None = None,
        before_compute: Callable[[], None] = lambda: None,
    ):
        self.mergefile = mergefile
        self.state = state
        self.request = request
        self.reporter = reporter or engine.Reporter()
        # Called once hashing or computing is certain (the CLI starts importing torch then).
        self.before_compute = before_compute
        self._current: plan.Plan | None = None
        # Sources hashed by the build's own reads instead of beforehand (`_read_once`).
        self._deferred: set[str] = set()

    def plan(self, changed: list[str] | None = None, hashing: bool = True) -> plan.Plan:
        """A plan of the requested targets; without ``hashing``, unhashed sources leave keys unknown.

        With ``changed`` (targets just built), only what lies downstream of them is expanded again.
        """
        state = self.state
        if hashing:
            digests = self._hashed_digests
        else:
            digests = lambda source: state.digests(source.info, compute=False)  # noqa: E731
        from mbuild.io import hub_reads

        # A hub model not in the cache: a plan that hashes downloads it; one that does not (a
        # dry run, status, a build's first plan) reads its headers alone, so a mistake is
        # found before a weight byte is fetched.
        with hub_reads(download=hashing):
            self._current = plan.make_plan(
                self.mergefile,
                self.request.targets,
                digests,
                self._conversions(write=hashing),
                self.request.shard_bytes,
                engine.output_digests(state, self.mergefile),
                store=state.folder,
                previous=self._current if changed is not None else None,
                changed=changed,
                platform=self.request.platform,
                pinned=lock.pinned_revisions(self.mergefile.path),
                adapters=self._adapters(write=hashing),
            )
        return self._current

    def build(self, open_cache: Callable[[], TensorCache | None]) -> dict[str, engine.TargetReport]:
        """Bring the requested targets up to date; ``open_cache`` is called only if something is stale."""
        request = self.request
        first = self.plan(hashing=False)
        decisions = staleness.decide_all(first, self.state)
        if not request.keep_going:
            staleness.refuse_foreign_outputs(first, decisions)
        stale = [name for name, decision in decisions.items() if decision.stale or request.force]
        executor = self._executor() if stale else None
        if executor is not None and executor.runs_elsewhere:
            if executor.computes_here:
                self.before_compute()  # torch's import goes on while the workers start
            else:
                self.before_compute = lambda: None  # a driver that computes nothing never imports torch
        try:
            return self._build(first, decisions, executor, open_cache)
        finally:
            if executor is not None:
                executor.close()

    def _build(self, first, decisions, executor, open_cache) -> dict[str, engine.TargetReport]:
        request = self.request
        if executor is not None:
            # Before any source is hashed: a job no worker could take is refused now.
            stale = [name for name, decision in decisions.items() if decision.stale or request.force]
            largest = engine.largest_job(first, stale, request.device)
            executor.check(largest)
            if largest is not None and not executor.runs_elsewhere:
                self._warn_if_too_big(largest)
            evaluation.refuse_unfitting(first, stale, request.device)  # a model an eval cannot hold
        if first.unhashed:
            self._deferred = self._read_once(first)
            first = self.plan()
            decisions = staleness.decide_all(first, self.state)
        for name in first.order:
            warning = dropped_warning(first.targets[name])
            if warning:
                self.reporter.warn(warning)
        if not request.force and not any(d.stale for d in decisions.values()):
            # Nothing to do: answer like make, without locks or the tensor cache.
            lock.repair_lock(first, self.state, list(first.order), self.reporter.note)
            return {
                name: engine.TargetReport(name, "fresh", (), 0, len(p.tasks), 0.0, str(p.target.output))
                for name, p in first.targets.items()
            }
        self.before_compute()
        options = engine.BuildOptions(
            force=request.force, jobs=request.jobs, device=request.device, keep_going=request.keep_going
        )
        cache = open_cache()
        try:
            with self.reporter.running(len(first.order)):
                return engine.Builder(first, self.state, options, self.reporter, cache, self.plan, executor).run()
        finally:
            if cache is not None:
                cache.close()

    def _executor(self):
        """Where tasks run: threads here, or a Ray cluster with results in the cache folder."""
        if self.request.executor != "ray":
            return executors.LocalExecutor(self.request.jobs, memory.task_budget(), staleness.task_memory)
        from mbuild import ray_executor

        storage = ray_executor.storage_in(self.state.folder)
        return ray_executor.RayExecutor(storage, self.request.ray_address, self.request.device)

    def _warn_if_too_big(self, job) -> None:
        """Say so, before anything runs, when the largest task alone may not fit this machine's memory.

        A warning, not an error: the estimate is within a quarter or so of what a task holds.
        """
        needs, room = job.memory + memory.BASELINE, memory.available_memory()
        if needs > room:
            self.reporter.warn(
                f"tensor '{job.task.name}' of target '{job.target.name}' needs about {needs / 1e9:.2f} GB to "
                f"compute and about {room / 1e9:.2f} GB is available here: the build may be killed for memory "
                "(a larger machine, or a compute dtype of bfloat16, needs less)"
            )

    def _read_once(self, first: plan.Plan) -> set[str]:
        """The unhashed sources the build may hash as it reads them, rather than read twice.

        A source whose files were never seen at their paths, read by targets that have no
        output yet: no cached result can lie below it, so hashing first would only double
        its reads. A changed file is hashed first (a touched file often holds the same bytes,
        and then nothing is rebuilt), and so is every source of a Ray build (its workers read).
        """
        if self.request.executor != "local":
            return set()
        deferred = set()
        for node in first.unhashed:
            if Node(node).kind == LORA:
                continue  # its base is hashed whole as the adapter is applied, before any read
            source = first.sources[node]
            if any(self.state.known(file) for file in source.info.weight_files):
                continue
            readers = [p for p in first.targets.values() if node in p.input_nodes]
            if any(p.target.output.exists() for p in readers):
                continue
            deferred.add(node)
        return deferred

    def _hashed_digests(self, source: plan.Source):
        """A source's digests, hashing it (with progress) if they are not remembered."""
        found = self.state.digests(source.info, compute=False)
        if found is None and source.node in self._deferred:
            return None  # hashed by the build's reads
        if found is None:
            self.before_compute()
            with self.reporter.step(f"hashing {source.ref}", source.info.nbytes) as advance:
                found = self.state.digests(source.info, compute=True, progress=advance)
        return found

    def _adapters(self, write: bool) -> Adapters:
        """Where base+adapter models are applied: their adapted tensors in the cache (made only when ``write``)."""
        return Adapters(Path(self.state.folder) / "lora", self.state, write, self._step)

    def _step(self, description: str, total: int):
        """A long step before the build (hashing a LoRA's base, applying it), with progress."""
        self.before_compute()
        return self.reporter.step(description, total)

    def _conversions(self, write: bool) -> Conversions | None:
        """Where pickled sources are read from (with --allow-pickle): their conversions in the cache."""
        if not self.request.allow_pickle:
            return None
        return Conversions(Path(self.state.folder) / "converted", self.state, write)


def dropped_warning(target_plan: plan.TargetPlan) -> str | None:
    """The input tensors a target with 'allow_mixed_architectures' leaves out of its output, as a warning."""
    dropped = target_plan.dropped
    if not dropped:
        return None
    shown = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
    return f"target '{target_plan.name}' takes no output tensor from {len(dropped)} input tensor(s): {shown}"

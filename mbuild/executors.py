"""Executors: where a target's tensor tasks run once the engine has them ready.

An executor is given a target's tasks and its `Work` (what the engine does with a task:
take its bytes from where they already are, run it here, or describe it as a `Job` that
runs on another machine and accept the result), and calls back with each outcome; it never
sees the lock, the manifest or the terminal. The local executor runs every task here on a
pool of threads; the Ray executor (`mbuild.ray_executor`) sends jobs to a cluster.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

# done(outcome, node): outcome is "computed" or "reused"; node is where a task ran, or None.
Done = Callable[[str, "str | None"], None]


@dataclass(frozen=True)
class Job:
    """A tensor task as another machine runs it: everything it reads is named by path.

    ``models`` hold only the tensors the task reads (their files on storage every node sees).
    ``platform`` and ``version`` are what the plan's keys name: a worker that would compute
    other bytes (another CPU class, another mbuild) refuses the job.
    """

    task: Any  # plan.TensorTask
    models: Mapping[str, Any]  # node -> io.ModelInfo
    target: Any  # the mergefile Target, for error locations
    vocabulary: Any
    device: str
    platform: str
    version: str
    memory: int  # bytes of working memory the plan estimates for it
    # (shard file, offset, length): where the output's shard, on storage every node sees,
    # takes the bytes; None for a job of a target not being built yet (its bytes go to storage).
    destination: tuple[str, int, int] | None = None

    @property
    def key(self) -> str:
        return self.task.key


@dataclass(frozen=True)
class JobResult:
    """What a remote job returns: where its bytes are, never the bytes."""

    key: str
    digest: str
    node: str
    computed: bool  # False: the storage already held them (an earlier run's)
    written: bool = False  # the bytes are in the job's destination, not in the storage


class Work(Protocol):
    """What the engine does with one target's tasks."""

    def run(self, task) -> str:
        """Run a task here by whatever path is cheapest; "computed" or "reused"."""

    def settle(self, task) -> str | None:
        """Take a task's bytes from the cache or the previous output ("reused"), or None."""

    def job(self, task) -> Job | None:
        """The task as a `Job` for another machine, or None for one that must run here."""

    def accept(self, task, data, digest: str, computed: bool) -> str:
        """Write bytes a job left in storage; "computed" or "reused"."""

    def written(self, task, digest: str) -> str:
        """Take bytes a job wrote into the task's place in the output itself; "computed"."""


class Executor(Protocol):
    runs_elsewhere: bool  # whether tasks may run on other machines (jobs are then made and prefetched)
    computes_here: bool  # whether this process is expected to compute tensors (it then imports torch early)

    def check(self, largest: Job | None) -> None:
        """Refuse, before anything runs, a job no worker could take."""

    def prefetch(self, jobs: Iterable[Job]) -> None:
        """Start jobs of targets not being built yet (their keys are final); their results wait."""

    def run(self, tasks: Iterable[Any], work: Work, done: Done) -> None:
        """Bring every task's bytes into the output; ``done`` receives each outcome, on this thread."""

    def close(self) -> None:
        """Release what the executor holds (a cluster connection)."""


class LocalExecutor:
    """Tasks on ``jobs`` threads, at most two per thread waiting, so memory stays at a few tensors per worker.

    With a ``budget`` (bytes) and a ``cost`` per task (its estimated working memory), tasks
    that would together need more than the budget wait for each other: one runs alone if it
    must. Which tasks overlap changes no byte.
    """

    runs_elsewhere = False
    computes_here = True

    def __init__(self, jobs: int, budget: int | None = None, cost: Callable[[Any], int] | None = None):
        self.jobs = max(1, jobs)
        self.budget = budget
        self.cost = cost or (lambda task: 0)

    def check(self, largest: Job | None) -> None:
        return None

    def prefetch(self, jobs: Iterable[Job]) -> None:
        return None

    def close(self) -> None:
        return None

    def run(self, tasks: Iterable[Any], work: Work, done: Done) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            pending: dict[concurrent.futures.Future, int] = {}  # future -> its task's cost
            for task in tasks:
                cost = self.cost(task) if self.budget is not None else 0
                while pending and (
                    len(pending) >= 2 * self.jobs
                    or (self.budget is not None and sum(pending.values()) + cost > self.budget)
                ):
                    self._collect(pending, done)
                pending[pool.submit(work.run, task)] = cost
            while pending:
                self._collect(pending, done)

    @staticmethod
    def _collect(pending: dict, done: Done) -> None:
        finished, _ = concurrent.futures.wait(list(pending), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            del pending[future]
            done(future.result(), None)

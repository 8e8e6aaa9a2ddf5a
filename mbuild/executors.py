"""Executors: what runs a target's tensor tasks once the engine has them ready.

An executor is given tasks and the function that runs one, and calls back with each
result as it completes; it never sees the lock, the manifest or the terminal. The local
executor runs them on a pool of threads; an executor for a cluster runs the same
function elsewhere.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Iterable, Protocol, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Executor(Protocol):
    def run(self, tasks: Iterable[Task], work: Callable[[Task], Result], done: Callable[[Result], None]) -> None:
        """Run ``work`` on every task; ``done`` receives each result, on the calling thread."""


class LocalExecutor:
    """Tasks on ``jobs`` threads, at most two per thread waiting, so memory stays at a few tensors per worker."""

    def __init__(self, jobs: int):
        self.jobs = max(1, jobs)

    def run(self, tasks: Iterable[Task], work: Callable[[Task], Result], done: Callable[[Result], None]) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
            pending: set[concurrent.futures.Future] = set()
            for task in tasks:
                pending.add(pool.submit(work, task))
                while len(pending) >= 2 * self.jobs:
                    pending = self._collect(pending, done)
            while pending:
                pending = self._collect(pending, done)

    @staticmethod
    def _collect(pending: set, done: Callable) -> set:
        finished, rest = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            done(future.result())
        return rest

"""`mbuild check`: every mistake a plan can find, and what a build would download, before one
weight byte is fetched.

A hub model the cache does not hold is planned from the hub's metadata: its file listing,
its small files (config, tokenizer) and its safetensors headers, read with range requests
(`io.hub_reads`). The planner then runs the checks it runs on local models (shapes, layer
counts, vocabularies, architectures), so a problem is the planner's own message naming the
file, the line and the target. Each target is planned on its own, so one bad target does not
hide another's problems.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mbuild import io, plan, session
from mbuild.errors import MbuildError


@dataclass(frozen=True)
class ModelDownload:
    """One hub model a request needs: its commit, and its bytes needed and not in the cache yet."""

    model: str  # repo@revision as written
    commit: str
    files: int
    needed_bytes: int
    download_bytes: int

    @property
    def in_cache(self) -> bool:
        return self.download_bytes == 0

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "in_cache": self.in_cache}


@dataclass(frozen=True)
class CheckReport:
    """What `mbuild check` found: the problems of each target, and what the build would download."""

    targets: tuple[str, ...]
    problems: tuple[str, ...]
    models: tuple[ModelDownload, ...]
    cache_folder: Path
    free_bytes: int

    @property
    def download_bytes(self) -> int:
        return sum(m.download_bytes for m in self.models)

    @property
    def fits(self) -> bool:
        """Whether the downloads fit on the disk of the hub cache."""
        return self.download_bytes <= self.free_bytes

    def as_json(self) -> dict:
        return {
            "targets": list(self.targets),
            "problems": list(self.problems),
            "models": [m.as_json() for m in self.models],
            "download_bytes": self.download_bytes,
            "disk_needed": self.download_bytes,
            "disk_free": self.free_bytes,
            "cache_folder": str(self.cache_folder),
        }


def check(mergefile, state, request: session.Request) -> CheckReport:
    """Plan each requested target (and those it reads) from headers alone; gather problems and downloads."""
    order = plan.select(mergefile, plan.build_graph(mergefile), request.targets)
    problems: list[str] = []
    with io.hub_reads(download=False) as reads:
        for name in order:
            one = dataclasses.replace(request, targets=(name,))
            try:
                session.Session(mergefile, state, one).plan(hashing=False)
            except MbuildError as error:
                if str(error) not in problems:  # a target reading a bad one fails with its error
                    problems.append(str(error))
    problems += _search_problems(mergefile, None if not request.targets else set(order))
    models = tuple(model_download(model) for model in reads.models.values())
    cache = io.hub.hub_cache_folder()
    return CheckReport(tuple(order), tuple(problems), models, cache, io.hub.free_disk(cache))


def _search_problems(mergefile, names) -> list[str]:
    """The mistakes of the `search:` entries for ``names`` (None: every entry), which only
    `mbuild search` reads otherwise: found here before a search is started."""
    from mbuild import search

    problems = []
    for name in search.search_names(mergefile):
        if names is not None and name not in names:
            continue
        try:
            search.read_search(mergefile, name)
        except MbuildError as error:
            problems.append(str(error))
    return problems


def model_download(model: io.HubModel) -> ModelDownload:
    """A hub model's row of the report: its files, and the bytes of them not in the cache."""
    files = len(model.files) if model.files is not None else sum(1 for p in model.folder.iterdir() if p.is_file())
    label = f"{model.repo_id}@{model.revision or 'main'}"
    return ModelDownload(label, model.commit, files, model.needed_bytes, model.missing_bytes)

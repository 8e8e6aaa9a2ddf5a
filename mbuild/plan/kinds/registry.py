"""The registry of target kinds (see `mbuild.plan.kinds`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mbuild.mergefile import Target
from mbuild.plan.tasks import TargetPlan


@dataclass(frozen=True)
class TargetKind:
    """One kind of target: its name, which targets it takes, what they run, how they expand."""

    name: str
    matches: Callable[[Target], bool]
    method: Callable[[Target], tuple[str, int, str]]  # (name, implementation version, paper)
    expand: Callable[..., TargetPlan]


_REGISTRY: dict[str, TargetKind] = {}


def register(kind: TargetKind) -> TargetKind:
    """Make `kind` available; a second kind with the same name is a ValueError."""
    if kind.name in _REGISTRY:
        raise ValueError(f"target kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def kind_of(target: Target) -> TargetKind:
    """The kind that takes `target`: the first registered that matches; LookupError if none does."""
    for kind in _REGISTRY.values():
        if kind.matches(target):
            return kind
    raise LookupError(f"no target kind takes target {target.name!r}")


def recipe_method(target: Target) -> tuple[str, int, str]:
    """(name, implementation version, paper) of what a target runs, as its kind names it."""
    return kind_of(target).method(target)

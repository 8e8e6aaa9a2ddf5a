"""Staleness: whether each target must be rebuilt, why, and what that would cost.

The one home of every rule: --force, an output mbuild may not replace, an output edited
by hand, the target's key against its manifest's, the reasons read from differences with
Mergefile.lock, what can be reused from the previous output or the cache, and the
per-tensor explanation `mbuild explain` prints. It reads outputs' manifests and the lock;
it never writes.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mbuild import io, keys, lock, memory
from mbuild.cache import State
from mbuild.errors import BuildError
from mbuild.nodes import Node
from mbuild.plan import Plan, TensorTask, TargetPlan, plain_recipe, recipe_method, source_fingerprint


class Action(str, enum.Enum):
    """What a build would do for a target."""

    FRESH = "fresh"
    CACHED = "cached"  # every tensor is in the cache or the previous output
    # It waits on upstream tensors not computed yet: if they come out identical, the cascade stops.
    WAITS = "rebuild unless upstream bytes are unchanged"
    REBUILD = "rebuild"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Decision:
    """Whether a target must be rebuilt, why (as before -> now differences), and what that costs."""

    stale: bool
    reasons: tuple[str, ...]
    action: Action = Action.REBUILD


def decide(
    plan: Plan,
    name: str,
    lock_entry: Mapping[str, Any] | None,
    manifest: Mapping[str, Any] | None,
    output_changes: Sequence[str],
    stale_upstream: set[str],
    source_fingerprints: Mapping[str, str | None],
    reusable: Callable[[TensorTask], bool] = lambda task: False,
) -> Decision:
    """The one place that decides whether a target is stale, with the reasons."""
    target_plan = plan.targets[name]
    target = target_plan.target

    def stale(reasons) -> Decision:
        if target_plan.pending:
            action = Action.WAITS
        elif target_plan.tasks and all(reusable(task) for task in target_plan.tasks):
            action = Action.CACHED
        else:
            action = Action.REBUILD
        return Decision(True, tuple(reasons), action)

    reasons: list[str] = []
    if manifest is None:
        reasons.append("output missing" if lock_entry else "never built")
        return stale(reasons)
    if target_plan.key is not None and manifest.get("key") == target_plan.key:
        if output_changes:
            return stale(f"output modified: {change}" for change in output_changes)
        return Decision(False, (), Action.FRESH)
    # Stale: explain by comparing with what was recorded at the last build.
    if lock_entry:
        if lock_entry.get("earlier"):
            reasons.append(lock_entry["earlier"])
        reasons.extend(recipe_diff(lock_entry.get("recipe", {}), plain_recipe(target.recipe)))
        method_name, version, _ = recipe_method(target)
        if lock_entry.get("method_version") not in (None, version):
            reasons.append(f"method {method_name}: version {lock_entry['method_version']} → {version}")
        if lock_entry.get("platform") not in (None, plan.platform):
            reasons.append(f"compute platform: {lock_entry['platform']} → {plan.platform}")
        recorded_inputs = lock_entry.get("inputs", {})
    else:
        recorded_inputs = {}
    for node in target_plan.input_nodes:
        label = Node(node).label
        if Node(node).is_target:
            if label in stale_upstream:
                reasons.append(f"input {label}: rebuilt")
            continue
        if lock_entry and lock_entry.get("earlier"):
            continue  # fingerprints of another digest, and none remembered yet: nothing to compare
        now = source_fingerprints.get(node)
        before = recorded_inputs.get(node)
        if now is None:
            reasons.append(f"source {label}: changed on disk (bytes not yet re-hashed)")
        elif before is not None and before != now:
            reasons.append(f"source {label}: content changed")
    if not reasons:
        reasons.append("inputs changed" if lock_entry else "built by another Mergefile or version")
    return stale(reasons)


def recipe_diff(before: Any, now: Any, prefix: str = "") -> list[str]:
    """Human differences between two recipes as 'path: before -> now' lines."""
    if isinstance(before, dict) and isinstance(now, dict):
        lines = []
        for key in list(before) + [k for k in now if k not in before]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in now:
                lines.append(f"{path}: {_short(before[key])} → (removed)")
            elif key not in before:
                lines.append(f"{path}: (unset) → {_short(now[key])}")
            else:
                lines.extend(recipe_diff(before[key], now[key], path))
        return lines
    if isinstance(before, list) and isinstance(now, list) and len(before) == len(now):
        lines = []
        for index, (b, n) in enumerate(zip(before, now)):
            lines.extend(recipe_diff(b, n, f"{prefix}[{index}]"))
        return lines
    if before != now:
        return [f"{prefix}: {_short(before)} → {_short(now)}"]
    return []


def _short(value: Any) -> str:
    text = keys.canonical(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class OutputState:
    """What is on disk for a target's output: its manifest and what changed since."""

    manifest: Mapping[str, Any] | None
    changes: list[str] = field(default_factory=list)
    foreign: bool = False  # a non-empty folder mbuild did not make, or holding what it did not write
    unlisted: list[str] = field(default_factory=list)  # entries its manifest does not list

    def refusal(self, folder: Path) -> str:
        """Why this output may not be replaced, for an error message."""
        if self.manifest is None:
            points = _sweep_points(folder)
            if points:  # `matrix:` was taken off a target whose points are still built in its folder
                shown = ", ".join(points[:3]) + (f" and {len(points) - 3} more" if len(points) > 3 else "")
                return (f"output folder {folder} holds the outputs of an earlier sweep ({shown}), "
                        "which mbuild will not replace with one model")
            return f"output folder {folder} exists and was not made by mbuild"
        shown = ", ".join(self.unlisted[:5]) + (f" and {len(self.unlisted) - 5} more" if len(self.unlisted) > 5 else "")
        return f"output folder {folder} holds what mbuild did not write there ({shown})"


def _sweep_points(folder: Path) -> list[str]:
    """The subfolders of ``folder`` that are mbuild outputs, when that is all it holds (a sweep's points)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    locks = {io.outputs.target_lock_file(entry).name for entry in entries}  # the lock beside each output
    entries = [entry for entry in entries if entry.name not in locks]
    outputs = [entry.name for entry in entries if entry.is_dir() and io.read_manifest(entry) is not None]
    return outputs if outputs and len(outputs) == len(entries) else []


def inspect_output(folder: Path) -> OutputState:
    """Read an output's manifest and compare its files' sizes and mtimes, reading no tensor."""
    manifest = io.read_manifest(folder)
    if manifest is None:
        foreign = folder.is_dir() and any(folder.iterdir())
        return OutputState(None, [], foreign)
    unlisted = io.unlisted_entries(folder, manifest)
    if unlisted:
        return OutputState(manifest, [], True, unlisted)
    changes = []
    for name, recorded in manifest.get("files", {}).items():
        try:
            stat = os.stat(folder / name)
        except FileNotFoundError:
            changes.append(f"{name} missing")
            continue
        if stat.st_size != recorded.get("size") or stat.st_mtime_ns != recorded.get("mtime_ns"):
            changes.append(f"{name} changed")
    return OutputState(manifest, changes)


def decide_all(
    plan: Plan,
    state: State | None,
    force: bool = False,
    has_tensor: Callable[[str], bool] = lambda key: False,
) -> dict[str, Decision]:
    """Decide staleness for every planned target, upstream first."""
    lock_data = lock.read(lock.lock_path(plan.mergefile.path))
    fingerprints = source_fingerprints(plan, state)
    decisions: dict[str, Decision] = {}
    stale: set[str] = set()
    for name in plan.order:
        decisions[name] = decide_target(plan, name, lock_data, fingerprints, stale, force, has_tensor)
        if decisions[name].stale:
            stale.add(name)
    return decisions


def decide_target(plan, name, lock_data, fingerprints, stale, force, has_tensor) -> Decision:
    """One target's decision, given the decisions upstream of it."""
    target_plan = plan.targets[name]
    output = inspect_output(target_plan.target.output)
    if force:
        return Decision(True, ("--force",))
    if output.foreign:
        return Decision(True, (output.refusal(target_plan.target.output) + ": refused",))
    return decide(
        plan,
        name,
        lock_data["targets"].get(name),
        output.manifest,
        output.changes,
        stale,
        fingerprints,
        reusable_in(output, has_tensor),
    )


def refuse_foreign_outputs(plan: Plan, decisions: Mapping[str, Decision]) -> None:
    """Raise, before any source is read, for the first stale target whose output mbuild may not replace."""
    for name in plan.order:
        output = plan.targets[name].target.output
        if decisions[name].stale:
            existing = inspect_output(output)
            if existing.foreign:
                raise BuildError(
                    existing.refusal(output) + "; move it away or choose another 'output:'",
                    plan.targets[name].target.location("output"),
                )


def reusable_in(output: OutputState, has_tensor: Callable[[str], bool]) -> Callable[[TensorTask], bool]:
    """Whether a task's bytes are already at hand: in the untouched previous output, or cached."""
    previous = {}
    if output.manifest and not output.changes:
        previous = {n: entry.get("key") for n, entry in output.manifest.get("tensors", {}).items()}
    return lambda task: task.key is not None and (previous.get(task.name) == task.key or has_tensor(task.key))


def source_fingerprints(plan: Plan, state: State | None) -> dict[str, str | None]:
    """Each source's content fingerprint from remembered digests (None if not hashed)."""
    result = {}
    for node, source in plan.sources.items():
        found = state.digests(source.info, compute=False) if state else None
        result[node] = source_fingerprint(source, found)
    return result


def estimate_work(
    target_plan: TargetPlan, reusable: Callable[[TensorTask], bool], jobs: int = 1, budget: int | None = None
) -> dict[str, int]:
    """What building a target would cost, from the plan alone: tensors to compute, input bytes
    to read, and the process's peak memory: its baseline (interpreter, torch) and the most that
    ``jobs`` tasks next to each other in order hold at once (each: its inputs as read and
    converted, the method's temporaries and the output), kept within ``budget`` as the local
    executor keeps them."""
    compute, read, sizes = 0, 0, []
    for task in target_plan.tasks:
        if reusable(task):
            continue
        compute += 1
        read += task_input_bytes(task)
        sizes.append(task_memory(task))
    # Tasks run in order, ``jobs`` at a time: the most that neighbours in that order hold together,
    # kept within the budget by the executor (a task larger than it runs alone).
    width = max(1, jobs)
    at_once = max((sum(sizes[i : i + width]) for i in range(len(sizes))), default=0)
    largest = max(sizes, default=0)
    if budget is not None and sizes:
        at_once = max(largest, min(at_once, budget))
    return {
        "tensors_to_compute": compute,
        "bytes_to_read": read,
        "peak_memory": memory.BASELINE + at_once if sizes else 0,
        "largest_task_memory": largest,
    }


def task_input_bytes(task: TensorTask) -> int:
    """The bytes a task reads: one stored tensor of its shape per model."""
    models = len(task.inputs) // task.inputs_per_model  # fused experts: each model's inputs make one tensor
    return task.nbytes * models


def _default_temporaries(models: int, compute_size: int) -> float:
    """Working bytes per element of a whole-tensor method that declares none: 2m + 2 tensors."""
    return (2 * models + 2) * compute_size


def task_memory(task: TensorTask) -> int:
    """A task's working memory: its inputs as read and converted, the method's temporaries, the output.

    An element-wise method (linear, task arithmetic) computes a slice at a time: its inputs as
    stored, the output and one slice of temporaries per model.
    """
    from mbuild import methods

    count = task.nbytes // io.DTYPE_SIZES[task.dtype]
    models = len(task.inputs) // task.inputs_per_model
    compute_size = io.DTYPE_SIZES[task.compute_dtype]
    try:
        method = methods.get(task.method)
    except KeyError:  # copy, concat, moe_gate
        method = None
    if method is not None and method.elementwise and not task.vocabulary and not task.fuse:
        slice_bytes = min(count, memory.ELEMENTWISE_SLICE) * compute_size * (models + 2)
        return task_input_bytes(task) + task.nbytes + slice_bytes
    temporaries = method.temporaries if method is not None and method.temporaries else _default_temporaries
    return task_input_bytes(task) + int(count * temporaries(models, compute_size)) + task.nbytes


def explain_tensors(target_plan: TargetPlan, manifest: Mapping[str, Any] | None) -> dict[str, list[str]]:
    """Why each tensor's key differs from the built output's: reason -> tensor names.

    Compares every planned task with the record the manifest keeps per tensor, down to
    the parameter or the input that changed.
    """
    recorded = (manifest or {}).get("tensors", {})
    groups: dict[str, list[str]] = {}
    for task in target_plan.tasks:
        old = recorded.get(task.name)
        reasons = _tensor_reasons(task, old)
        for reason in reasons:
            groups.setdefault(reason, []).append(task.name)
    return groups


def _tensor_reasons(task: TensorTask, old: Mapping[str, Any] | None) -> list[str]:
    if old is None:
        return ["new tensor"]
    if task.key is not None and old.get("key") == task.key:
        return []
    reasons = []
    if old.get("method") != task.method:
        reasons.append(f"method: {old.get('method')} → {task.method}")
    for field_name, now in (("dtype", task.dtype), ("compute_dtype", task.compute_dtype)):
        if old.get(field_name) != now:
            reasons.append(f"{field_name}: {old.get(field_name)} → {now}")
    before_params = old.get("params", {})
    for name, value in task.params:
        if before_params.get(name) != plain_recipe(value):  # the manifest holds JSON: a tuple came back a list
            reasons.append(f"parameters.{name}: {_short(before_params.get(name))} → {_short(value)}")
    before_models = old.get("model_params", [])
    labels = [f"{i.node.split(':', 1)[1]}" for i in task.inputs]
    model_labels = labels[:: task.inputs_per_model]
    for index, values in enumerate(task.model_params):
        before = before_models[index] if index < len(before_models) else {}
        for name, value in values:
            if before.get(name) != value:
                reasons.append(f"{model_labels[index]}.{name}: {_short(before.get(name))} → {_short(value)}")
    before_keys = old.get("input_keys", [])
    for index, item in enumerate(task.inputs):
        before = before_keys[index] if index < len(before_keys) else None
        if item.key is None:
            reasons.append(f"input {labels[index]}: bytes not hashed yet")
        elif before != item.key:
            reasons.append(
                f"input {labels[index]}: " + ("to be rebuilt" if keys.is_pending(item.key) else "bytes changed")
            )
    return reasons or ["method implementation version"]

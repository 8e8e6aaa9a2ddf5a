"""Sweeps: a target written with `matrix:` becomes one ordinary target per combination of values.

Expanded while the Mergefile is read, so that everything after (the plan, keys, staleness,
the lock, the CLI) sees plain targets and needs no notion of a sweep: a point shares every
tensor its recipe shares with the other points through the tensor cache, and a point whose
values did not change stays fresh when a value list grows.

The rules (README: "Sweeps"):

- ``matrix: {PARAM: [v1, v2, ...], ...}`` on a merge recipe. ``PARAM`` is a key of the
  recipe's top-level ``parameters:`` (``t``, ``density``, ``weight``), whose value it
  replaces, or ``PARAM@MODEL``: that parameter of the ``models:`` entry written ``MODEL``.
  Values are single values (numbers, words); a per-layer gradient is swept by `search:`.
- Each combination is the target ``NAME[PARAM=v1,PARAM2=w1]``: parameters in the order
  written, values spelled as written in the YAML (``0.30`` stays ``0.30``).
- A point's output folder is ``OUTPUT/PARAM=v1,PARAM2=w1`` where ``OUTPUT`` is the target's
  ``output:`` or ``build/NAME``: no brackets in paths (a shell's glob and mbuild's own
  leftover search would read them as patterns), and the points of a sweep sit together.
- A target that reads a sweep by its bare name is swept with it, point for point:
  ``ppl: {eval: {model: final, ...}}`` becomes ``ppl[t=0.3]``, ``ppl[t=0.5]``, ... each over
  the matching ``final[...]``. A target may read several sweeps; it then runs over their
  product, and two of them may not vary a parameter of the same name.
- ``mbuild NAME`` (and ``clean``, ``explain``) with a sweep's bare name means all its points.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mbuild.errors import Location, MergefileError
from mbuild.mergefile.recipe import Sweep, Target

# Each point is a full model on disk: a sweep larger than this is almost surely a mistake.
MATRIX_LIMIT = 256
# What a value may be spelled as, since it becomes part of a folder's name.
SPELLING = re.compile(r"^[A-Za-z0-9_.+\-]+$")
PARAMETER = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(@(?P<model>[A-Za-z0-9_.\-]+))?$")
# Kinds of target whose body has no merge parameters to sweep.
UNSWEPT_KINDS = ("experts", "gguf", "extract_lora", "eval")


class ParameterName:
    """What a swept or searched ``parameter`` names: ``t`` (the recipe's) or ``weight@math`` (a model's)."""

    parameter: str

    @property
    def name(self) -> str:
        return PARAMETER.match(self.parameter)["name"]

    @property
    def model(self) -> str | None:
        """The `models:` entry written so, or None for the recipe's own `parameters:`."""
        return PARAMETER.match(self.parameter)["model"]


@dataclass(frozen=True)
class Axis(ParameterName):
    """One parameter of one `matrix:`: its values, their spellings and lines."""

    origin: str  # the written target whose `matrix:` declares it
    parameter: str  # as written: "t" or "weight@math"
    values: tuple
    spellings: tuple[str, ...]
    lines: tuple[int | None, ...]


def point_name(name: str, axes: tuple[Axis, ...], choice: tuple[int, ...]) -> str:
    """``NAME[PARAM=value,...]`` of one combination (``choice``: an index into each axis' values)."""
    return f"{name}[{_assignments(axes, choice)}]"


def _assignments(axes: tuple[Axis, ...], choice: tuple[int, ...]) -> str:
    return ",".join(f"{axis.parameter}={axis.spellings[index]}" for axis, index in zip(axes, choice))


class _AnyPoint(dict):
    """Target names while sweeps are being discovered: any ``NAME[...]`` of a written ``NAME`` is taken."""

    def __init__(self, written):
        super().__init__((name, name) for name in written)

    def __contains__(self, text) -> bool:
        head, bracket, _ = str(text).partition("[")
        return super().__contains__(text) or (bool(bracket) and str(text).endswith("]") and super().__contains__(head))

    def __getitem__(self, text):
        return text


def check_targets(checker, bodies: Mapping[str, Any], defaults: dict, spellings: Mapping[tuple, str]) -> None:
    """Check every written target into ``checker.mergefile.targets``, each sweep as its points."""
    mergefile = checker.mergefile
    own = {name: _axes(checker, name, body, spellings) for name, body in bodies.items() if _has_matrix(body)}
    if not own:  # no sweep: each target is checked once, as written (what most Mergefiles are)
        names = {name: name for name in bodies}
        for name, body in bodies.items():
            mergefile.targets[name] = checker.target(name, body, defaults, names)
        return
    reads = _bare_reads(checker, bodies, defaults, own)
    axes: dict[str, tuple[Axis, ...]] = {}
    for name in bodies:
        _sweep_axes(checker, name, own, reads, axes, ())
    names: dict[str, str] = {}
    for name in bodies:
        if axes[name]:
            names.update((point, point) for point in _points(name, axes[name]))
        else:
            names[name] = name
    for name, body in bodies.items():
        if not axes[name]:
            mergefile.targets[name] = checker.target(name, body, defaults, names)
            continue
        sweep_axes = axes[name]
        points = {}
        for choice in itertools.product(*(range(len(axis.values)) for axis in sweep_axes)):
            point = point_name(name, sweep_axes, choice)
            aliases = _aliases(name, sweep_axes, choice, reads, axes)
            point_body = _point_body(checker, name, body, defaults, sweep_axes, choice)
            target = checker.target(point, point_body, defaults, {**names, **aliases})
            # Its own folder; the recipe (what the lock and the model card record) stays as written.
            target = dataclasses.replace(target, output=_point_output(checker, name, body, sweep_axes, choice))
            _check_read(checker, target, name, sweep_axes)
            mergefile.targets[point] = target
            points[point] = tuple(axis.spellings[index] for axis, index in zip(sweep_axes, choice))
        mergefile.sweeps[name] = Sweep(name, tuple(axis.parameter for axis in sweep_axes), points)


def _has_matrix(body: Any) -> bool:
    return isinstance(body, dict) and "matrix" in body


def _axes(checker, name: str, body: dict, spellings: Mapping[tuple, str]) -> tuple[Axis, ...]:
    """The checked `matrix:` of a written target, one axis per parameter in written order."""
    path = ("targets", name, "matrix")
    matrix = body["matrix"]
    if kind := next((key for key in UNSWEPT_KINDS if key in body), None):
        raise _error(checker, path, f"'matrix' sweeps a merge recipe's parameters; a '{kind}' target has none "
                            "(name a sweep by its bare name as its model to run it over every point)")
    if not isinstance(matrix, dict) or not matrix:
        raise _error(checker, path, "'matrix' maps parameter names to lists of values, e.g. {t: [0.3, 0.5]}")
    axes = []
    for parameter, values in matrix.items():
        where = path + (parameter,)
        if not isinstance(parameter, str) or not PARAMETER.match(parameter):
            raise _error(checker, where, f"{parameter!r} is not a parameter: write PARAM (the recipe's parameters) "
                                "or PARAM@MODEL (that model's entry in 'models:')")
        if not isinstance(values, list) or not values:
            raise _error(checker, where, f"'{parameter}' needs a non-empty list of values, not {values!r}")
        written = []
        for index, value in enumerate(values):
            spelled = spellings.get(where + (index,))
            if isinstance(value, (dict, list)) or value is None or spelled is None:
                raise _error(checker, where + (index,), f"a value of '{parameter}' is a single number or word, "
                                    f"not {value!r} (a per-layer gradient is searched with 'search:')")
            if not SPELLING.match(spelled):
                raise _error(checker, where + (index,), f"value {spelled!r} of '{parameter}': only letters, digits and "
                                    "'_.+-' (it names the point's target and folder)")
            if any(value == other and isinstance(value, bool) == isinstance(other, bool) for other in written):
                raise _error(checker, where + (index,), f"value {spelled} of '{parameter}' is listed twice")
            written.append(value)
        axes.append(Axis(name, parameter, tuple(values), tuple(spellings[where + (i,)] for i in range(len(values))),
                         tuple(checker.mergefile.location(where + (i,)).line for i in range(len(values)))))
    return tuple(axes)


def _bare_reads(checker, bodies, defaults, own) -> dict[str, dict[str, int | None]]:
    """The written targets each target reads by bare name (with the reference's line), from a first
    check of every body.

    A body with a matrix is checked as its first point; every ``NAME[...]`` of a written name
    is taken as a target, since which of them exist is known only once sweeps are known.
    """
    written = _AnyPoint(bodies)
    reads = {}
    for name, body in bodies.items():
        if name in own:
            first = tuple(0 for _ in own[name])
            body = _point_body(checker, name, body, defaults, own[name], first)
            target = checker.target(point_name(name, own[name], first), body, defaults, written)
        else:
            target = checker.target(name, body, defaults, written)
        reads[name] = {ref.location: ref.line for ref in target.references() if ref.kind == "target" and ref.location in bodies}
    return reads


def _sweep_axes(checker, name: str, own, reads, axes: dict, visiting: tuple) -> tuple[Axis, ...]:
    """A target's axes: its own `matrix:`, then those of every sweep it reads by bare name."""
    if name in axes:
        return axes[name]
    if name in visiting:
        cycle = visiting[visiting.index(name):] + (name,)
        if not any(member in own for member in cycle):
            return ()  # no sweep in it: the dependency check reports it
        # Reported here, at the reference that closes it: a swept target could not be named otherwise.
        line = reads[visiting[-1]][name]
        raise MergefileError("dependency cycle: " + " -> ".join(cycle), Location(checker.mergefile.path, line, visiting[-1]))
    result = list(own.get(name, ()))
    for read in reads[name]:
        for axis in _sweep_axes(checker, read, own, reads, axes, visiting + (name,)):
            if any(axis is mine for mine in result):
                continue
            clash = next((mine for mine in result if mine.parameter == axis.parameter), None)
            if clash is not None:
                raise MergefileError(
                    f"reads sweeps '{clash.origin}' and '{axis.origin}' that both vary '{axis.parameter}': "
                    "name one of their points instead", checker.mergefile.location(("targets", name), name))
            result.append(axis)
    count = 1
    for axis in result:
        count *= len(axis.values)
    if count > MATRIX_LIMIT:
        path = ("targets", name, "matrix") if name in own else ("targets", name)
        raise MergefileError(f"the sweep makes {count} targets, more than {MATRIX_LIMIT}: shorten its value lists",
                             checker.mergefile.location(path, name))
    axes[name] = tuple(result)
    return axes[name]


def _points(name: str, axes: tuple[Axis, ...]) -> list[str]:
    return [point_name(name, axes, choice) for choice in itertools.product(*(range(len(a.values)) for a in axes))]


def _aliases(name, sweep_axes, choice, reads, axes) -> dict[str, str]:
    """Each sweep read by bare name, standing for its point with this combination's values."""
    chosen = {(axis.origin, axis.parameter): index for axis, index in zip(sweep_axes, choice)}
    aliases = {}
    for read in reads[name]:
        if axes[read]:
            aliases[read] = point_name(read, axes[read], tuple(chosen[(a.origin, a.parameter)] for a in axes[read]))
    return aliases


def _point_body(checker, name: str, body: dict, defaults: dict, sweep_axes, choice) -> dict:
    """The body of one point: the written body with its own axes' values set.

    The lines of the written target are copied to the point's name, and each value set
    points at its line in the `matrix:`, so a mistake in a point is shown where it is written.
    """
    point = point_name(name, sweep_axes, choice)
    lines = checker.mergefile.lines
    for path, line in list(lines.items()):
        if path[:2] == ("targets", name):
            lines[("targets", point) + path[2:]] = line
    result = {key: value for key, value in body.items() if key != "matrix"}
    for axis, index in zip(sweep_axes, choice):
        if axis.origin != name:
            continue
        value, line = axis.values[index], axis.lines[index]
        if axis.model is None:
            result["parameters"] = {**(result.get("parameters") or {}), axis.name: value}
            lines[("targets", point, "parameters", axis.name)] = line
            continue
        position, entries = _model_entry(checker, name, body, defaults, axis)
        entry = entries[position]
        entry = dict(entry) if isinstance(entry, dict) else {"model": entry}
        entry["parameters"] = {**(entry.get("parameters") or {}), axis.name: value}
        entries[position] = entry
        result["models"] = entries
        lines[("targets", point, "models", position, "parameters", axis.name)] = line
    return result


def _point_output(checker, name: str, body: dict, sweep_axes, choice) -> Path:
    """``OUTPUT/PARAM=value,...``: the point's folder inside the target's ``output:`` (default build/NAME)."""
    output = Path(str(body.get("output", f"build/{name}"))).expanduser()
    return (checker.mergefile.folder / output / _assignments(sweep_axes, choice)).absolute()


def _model_entry(checker, name, body, defaults, axis: Axis) -> tuple[int, list]:
    """The position of the `models:` entry written ``axis.model``, and a copy of the list."""
    entries = body.get("models", defaults.get("models"))
    where = ("targets", name, "matrix", axis.parameter)
    if not isinstance(entries, list):
        raise _error(checker, where, f"'{axis.parameter}' names a model of 'models:', and the recipe has no 'models:' list")
    written = [entry.get("model") if isinstance(entry, dict) else entry for entry in entries]
    if axis.model not in written:
        shown = ", ".join(str(text) for text in written)
        raise _error(checker, where, f"no entry of 'models:' is written '{axis.model}' (they are: {shown})")
    return written.index(axis.model), list(entries)


def _check_read(checker, target: Target, name: str, sweep_axes) -> None:
    """Refuse a swept parameter the recipe's method does not read: every point would be one model."""
    for axis in sweep_axes:
        if axis.origin != name:
            continue
        if axis.model is None:
            read = axis.name in target.parameters
        else:
            written = [e.get("model") if isinstance(e, dict) else e for e in target.recipe.get("models", ())]
            position = written.index(axis.model)
            read = any(axis.name in model.parameters for model in target.models if model.path[-1] == position)
        if not read:
            raise MergefileError(
                f"{target.method} does not read '{axis.parameter}' here: every point of the sweep would be the same model",
                checker.mergefile.location(("targets", name, "matrix", axis.parameter), name))


def _error(checker, path: tuple, message: str) -> MergefileError:
    """An error at ``path`` (under 'targets'), naming the written target."""
    return MergefileError(message, checker.mergefile.location(path, path[1]))

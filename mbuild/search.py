"""Recipe search: Optuna proposes a recipe's parameters, each trial is an ordinary build plus its eval.

A trial is the searched target with the trial's values, built into the search's own folder
(``build/search/NAME``) with the eval target that scores it (and any target between them):
the same plan, keys, cache and engine as `mbuild`, so a trial recomputes only the tensors
whose recipe changed, and every tensor two trials share is computed once. The user's outputs
and Mergefile.lock are never touched by a trial; the search keeps its own lock in its folder.

The section it reads (README: "Search"):

    search:
      final:                    # the target searched: a merge recipe
        objective: ppl          # an eval target that reads it
        direction: minimize     # default: minimize for perplexity, else maximize
        sampler: tpe            # or cmaes (needs the cmaes package)
        trials: 8
        seed: 0
        space:
          t: {low: 0, high: 1, anchors: 3}   # a gradient: one value per anchor
          density: {low: 0.2, high: 0.8, step: 0.1}  # one value (on a grid of step)
          weight@math: [0.3, 0.5, 0.7]       # choices; @MODEL: that model's entry of models:

Values drawn from a range are rounded to `DECIMALS` places before the trial is built, so the
recipe `--apply` writes is exactly the one that was scored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from mbuild import io, keys, methods
from mbuild.errors import Location, MbuildError, MergefileError
from mbuild.mergefile import Mergefile, Target, check_outputs
from mbuild.mergefile.matrix import PARAMETER, ParameterName
from mbuild.mergefile.values import suggest
from mbuild.mergefile.yaml_loading import MERGEFILE_LIMIT, load_yaml
from mbuild.nodes import Node

SECTION = "search"
SEARCH_KEYS = ("objective", "direction", "sampler", "trials", "seed", "space")
RANGE_KEYS = ("low", "high", "step", "anchors")
SAMPLERS = ("tpe", "cmaes")
DIRECTIONS = ("minimize", "maximize")
TRIAL_LIMIT = 1000
ANCHOR_LIMIT = 64
DECIMALS = 4
BEST_SUFFIX = "-best"  # `--apply` writes the best recipe as the target NAME-best


@dataclass(frozen=True)
class Dimension(ParameterName):
    """One searched parameter: a range (one value, or one per anchor of a gradient) or choices."""

    parameter: str  # "t" or "weight@math", as written
    low: float | None = None
    high: float | None = None
    step: float | None = None  # values low, low + step, ... only (trials then share more tensors)
    anchors: int | None = None  # a gradient of this many values
    choices: tuple = ()
    integer: bool = False  # the method declares the parameter a whole number


@dataclass(frozen=True)
class Search:
    """A checked `search:` entry and what it runs over."""

    name: str  # the searched target
    objective: str  # the eval target whose score is optimised
    direction: str
    sampler: str
    trials: int
    seed: int
    dimensions: tuple[Dimension, ...]
    body: Mapping[str, Any]  # the searched target's body as written (for --apply)
    text: str  # the Mergefile's text when read (--apply refuses a file changed since)
    lines: Mapping[tuple, int] = field(repr=False)

    @property
    def best_name(self) -> str:
        return self.name + BEST_SUFFIX


@dataclass
class TrialResult:
    """One trial: its values, its score, and what its build reused."""

    number: int
    values: dict[str, Any]
    score: float | None = None
    status: str = "done"  # "done" | "failed"
    tensors_computed: int = 0
    tensors_reused: int = 0
    shared: int = 0  # tensors of the searched target whose keys an earlier trial's plan had
    key: str | None = None  # the searched target's key
    output_digest: str | None = None  # of the searched target's tensor digests
    error: str | None = None
    build_seconds: float = 0.0  # the searched target's build (0: nothing was stale)
    eval_seconds: float = 0.0  # the objective's eval (0: its score came from the cache)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_names(mergefile: Mergefile) -> list[str]:
    """The targets the Mergefile's `search:` section has an entry for, as written."""
    text = io.read_small_file(mergefile.path, MERGEFILE_LIMIT, MergefileError).decode("utf-8")
    data, _ = load_yaml(text, mergefile.path)
    sections = data.get(SECTION) if isinstance(data, dict) else None
    return [str(name) for name in sections] if isinstance(sections, dict) else []


def read_search(mergefile: Mergefile, name: str) -> Search:
    """The `search:` entry of target ``name``, checked; every mistake names its line."""
    text = io.read_small_file(mergefile.path, MERGEFILE_LIMIT, MergefileError).decode("utf-8")
    data, lines = load_yaml(text, mergefile.path)
    sections = data.get(SECTION) if isinstance(data, dict) else None
    where = Location(mergefile.path, lines.get((SECTION,)), name)

    def error(path: tuple, message: str) -> MergefileError:
        for end in range(len(path), 0, -1):
            if path[:end] in lines:
                return MergefileError(message, Location(mergefile.path, lines[path[:end]], name))
        return MergefileError(message, where)

    if not isinstance(sections, dict) or name not in sections:
        known = sorted(sections) if isinstance(sections, dict) else []
        raise MergefileError(f"no search for '{name}' under '{SECTION}:'{suggest(name, known)}", where)
    spec, path = sections[name], (SECTION, name)
    if not isinstance(spec, dict):
        raise error(path, f"a search is a mapping of {', '.join(SEARCH_KEYS)}")
    for key in spec:
        if key not in SEARCH_KEYS:
            raise error(path + (key,), f"unknown key '{key}'{suggest(str(key), SEARCH_KEYS)}")
    target = _searched_target(mergefile, name, error)
    objective = _objective(mergefile, spec, name, error)
    default = "minimize" if objective.evaluation.metric == "perplexity" else "maximize"
    direction = spec.get("direction", default)
    if direction not in DIRECTIONS:
        raise error(path + ("direction",), f"'direction' is minimize or maximize, not {direction!r}")
    sampler = spec.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise error(path + ("sampler",), f"unknown sampler {sampler!r}{suggest(str(sampler), SAMPLERS)}: tpe or cmaes")
    trials, seed = spec.get("trials", 20), spec.get("seed", 0)
    if not _whole(trials) or not 1 <= trials <= TRIAL_LIMIT:
        raise error(path + ("trials",), f"'trials' is a whole number from 1 to {TRIAL_LIMIT}, not {trials!r}")
    if not _whole(seed) or seed < 0:
        raise error(path + ("seed",), f"'seed' is a non-negative whole number, not {seed!r}")
    space = spec.get("space")
    if not isinstance(space, dict) or not space:
        raise error(path + ("space",), "'space' maps parameters to {low, high[, anchors]} or to a list of choices")
    dimensions = tuple(_dimension(target, parameter, value, path + ("space", parameter), error)
                       for parameter, value in space.items())
    body = data["targets"][name]
    return Search(name, objective.name, direction, sampler, trials, seed, dimensions, body, text, lines)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _searched_target(mergefile: Mergefile, name: str, error) -> Target:
    if name in mergefile.sweeps or any(name in sweep.points for sweep in mergefile.sweeps.values()):
        raise error((SECTION, name), f"'{name}' is a sweep (matrix:) or one of its points: search a target without one")
    target = mergefile.targets.get(name)
    if target is None:
        raise error((SECTION, name), f"no target named '{name}'{suggest(name, list(mergefile.targets))}")
    if target.moe or target.gguf or target.extract_lora or target.evaluation:
        raise error((SECTION, name), f"'{name}' is not a merge recipe: a search varies a merge's parameters")
    return target


def _objective(mergefile: Mergefile, spec: dict, name: str, error) -> Target:
    """The eval target scoring each trial: it must read the searched target, directly or not."""
    path = (SECTION, name, "objective")
    objective = spec.get("objective")
    if not isinstance(objective, str) or objective not in mergefile.targets:
        evals = [n for n, t in mergefile.targets.items() if t.evaluation is not None]
        raise error(path, f"'objective' names an eval target, not {objective!r}{suggest(str(objective), evals)}")
    target = mergefile.targets[objective]
    if target.evaluation is None:
        raise error(path, f"'{objective}' is not an eval target: the objective is the score of one")
    if Node.target(name) not in _ancestors(mergefile, objective):
        raise error(path, f"'{objective}' does not read '{name}': its score would not change between trials")
    return target


def _ancestors(mergefile: Mergefile, name: str) -> set[str]:
    import networkx as nx

    from mbuild.mergefile import build_graph

    return nx.ancestors(build_graph(mergefile), Node.target(name))


def _dimension(target: Target, parameter: Any, value: Any, path: tuple, error) -> Dimension:
    """One entry of `space:`, checked against the method's declaration of the parameter."""
    if not isinstance(parameter, str) or not PARAMETER.match(parameter):
        raise error(path, f"{parameter!r} is not a parameter: write PARAM or PARAM@MODEL")
    dimension = Dimension(parameter)
    method = methods.get(target.method)
    try:
        declared = method.parameter(dimension.name)
    except KeyError:
        names = ", ".join(p.name for p in method.parameters)
        raise error(path, f"{method.name} has no parameter '{dimension.name}' (it takes: {names})") from None
    if dimension.model is not None:
        if not declared.per_model:
            raise error(path, f"'{dimension.name}' is one value per tensor for {method.name}, not per model")
        if dimension.model not in _written_models(target):
            raise error(path, f"no entry of 'models:' is written '{dimension.model}'")
    if isinstance(value, list):
        if not value or any(isinstance(choice, (dict, list)) or choice is None for choice in value):
            raise error(path, "a list of choices holds single values, at least one")
        for choice in value:
            _validate(declared, choice, path, error)
        return dataclasses.replace(dimension, choices=tuple(value))
    if not isinstance(value, dict) or "low" not in value or "high" not in value:
        raise error(path, "a range is {low, high} (and 'anchors' for a gradient), or give a list of choices")
    for key in value:
        if key not in RANGE_KEYS:
            raise error(path + (key,), f"unknown key '{key}'{suggest(str(key), RANGE_KEYS)}")
    low, high, step, anchors = value["low"], value["high"], value.get("step"), value.get("anchors")
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise error(path, f"'low' and 'high' are numbers, not {bound!r}")
        _validate(declared, bound, path, error)
    if not low < high:
        raise error(path, f"'low' ({low}) must be below 'high' ({high})")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= high - low):
        raise error(path + ("step",), f"'step' is a number above 0 and at most high - low, not {step!r}")
    if step is not None and not _divides(step, high - low):
        # Optuna would drop the top of the range to the last whole step, and only warn.
        raise error(path + ("step",), f"'step' {step!r} does not divide high - low ({high} - {low}): the grid would miss {high}")
    if anchors is not None and (not _whole(anchors) or not 1 <= anchors <= ANCHOR_LIMIT):
        raise error(path + ("anchors",), f"'anchors' is a whole number from 1 to {ANCHOR_LIMIT}, not {anchors!r}")
    return dataclasses.replace(dimension, low=low, high=high, step=step, anchors=anchors, integer=declared.type is int)


def _validate(declared, value: Any, path: tuple, error) -> None:
    try:
        declared.validate(value)
    except (ValueError, TypeError) as problem:
        raise error(path, f"bad value for '{declared.name}': {problem}") from None


def _written_models(target: Target) -> list:
    return [entry.get("model") if isinstance(entry, dict) else entry for entry in target.recipe.get("models", ())]


# ---------------------------------------------------------------------------------------------
# Trials


def suggest_values(search: Search, trial) -> dict[str, Any]:
    """The values an Optuna trial proposes, one per dimension (a list for a gradient)."""
    values = {}
    for dimension in search.dimensions:
        if dimension.choices:
            values[dimension.parameter] = trial.suggest_categorical(dimension.parameter, list(dimension.choices))
        elif dimension.anchors is None:
            values[dimension.parameter] = _drawn(trial, dimension.parameter, dimension)
        else:
            values[dimension.parameter] = [
                _drawn(trial, f"{dimension.parameter}[{index}]", dimension) for index in range(dimension.anchors)
            ]
    return values


def _drawn(trial, label: str, dimension: Dimension):
    if dimension.integer:
        return trial.suggest_int(label, int(dimension.low), int(dimension.high), step=int(dimension.step or 1))
    value = trial.suggest_float(label, float(dimension.low), float(dimension.high), step=dimension.step)
    return round(value, DECIMALS)


def with_values(body: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe body with each searched parameter set: the recipe's `parameters:`, or a model's."""
    result = dict(body)
    for parameter, value in values.items():
        match = PARAMETER.match(parameter)
        name, model = match["name"], match["model"]
        if model is None:
            result["parameters"] = {**(result.get("parameters") or {}), name: value}
            continue
        entries = list(result["models"])
        written = [entry.get("model") if isinstance(entry, dict) else entry for entry in entries]
        position = written.index(model)
        entry = entries[position]
        entry = dict(entry) if isinstance(entry, dict) else {"model": entry}
        entry["parameters"] = {**(entry.get("parameters") or {}), name: value}
        entries[position] = entry
        result["models"] = entries
    return result


def trial_mergefile(mergefile: Mergefile, search: Search, values: Mapping[str, Any], folder: Path) -> Mergefile:
    """The Mergefile of one trial: the searched target with ``values``, built into ``folder``.

    Every target between it and the objective (and the objective) also writes into ``folder``,
    so no output of the user's is replaced by a trial's; the targets the searched one reads
    are the user's own, built as `mbuild` would build them.
    """
    targets: dict[str, Target] = {}
    moved = {search.name} | _between(mergefile, search)
    for name, target in mergefile.targets.items():
        if name == search.name:
            target = _with_trial_values(target, values)
        if name in moved:
            target = dataclasses.replace(target, output=folder / _folder_name(name))
        targets[name] = target
    trial = Mergefile(path=folder / "Mergefile", targets=targets, lines=mergefile.lines, sweeps=mergefile.sweeps)
    check_outputs(trial)
    return trial


def _between(mergefile: Mergefile, search: Search) -> set[str]:
    """The targets downstream of the searched one that the objective reads, and the objective."""
    import networkx as nx

    from mbuild.mergefile import build_graph

    graph = build_graph(mergefile)
    below = nx.descendants(graph, Node.target(search.name))
    above = nx.ancestors(graph, Node.target(search.objective)) | {Node.target(search.objective)}
    return {Node(node).label for node in below & above}


def _folder_name(name: str) -> str:
    """A target's folder in the search's: its name, with what is not plain in a path replaced."""
    return re.sub(r"[^A-Za-z0-9_.@=,+\-]", "_", name)


def _with_trial_values(target: Target, values: Mapping[str, Any]) -> Target:
    """The searched target with the trial's values: in its parameters and in its recorded recipe."""
    parameters = dict(target.parameters)
    models = list(target.models)
    written = _written_models(target)
    for parameter, value in values.items():
        match = PARAMETER.match(parameter)
        if match["model"] is None:
            parameters[match["name"]] = value
            continue
        position = written.index(match["model"])
        for index, model in enumerate(models):
            if model.path[-1] == position:
                models[index] = dataclasses.replace(model, parameters={**model.parameters, match["name"]: value})
    return dataclasses.replace(target, parameters=parameters, models=tuple(models),
                               recipe=with_values(target.recipe, values))


def run_trials(
    search: Search,
    mergefile: Mergefile,
    build: Callable[[Mergefile], tuple[Mapping[str, Any], Any]],
    score_of: Callable[[Target], float | None],
    folder: Path,
    on_trial: Callable[[TrialResult], None] = lambda result: None,
) -> list[TrialResult]:
    """Run the search's trials through Optuna; ``build`` builds a trial's Mergefile and returns
    (its reports by target, its plan after the build), ``score_of`` reads the objective's score."""
    optuna = _optuna(search.sampler)
    sampler = (optuna.samplers.CmaEsSampler(seed=search.seed, warn_independent_sampling=False)
               if search.sampler == "cmaes" else optuna.samplers.TPESampler(seed=search.seed))
    study = optuna.create_study(direction=search.direction, sampler=sampler)
    seen: set[str] = set()
    results = []
    for number in range(search.trials):
        trial = study.ask()
        result = TrialResult(number, suggest_values(search, trial))
        trial_file = trial_mergefile(mergefile, search, result.values, folder)
        reports, the_plan = build(trial_file)
        report = reports.get(search.name)
        if report is not None:
            result.tensors_computed, result.tensors_reused = report.tensors_computed, report.tensors_reused
            result.build_seconds = round(report.seconds, 3)
        if search.objective in reports:
            result.eval_seconds = round(reports[search.objective].seconds, 3)
        failed = [r for r in reports.values() if r.status in ("failed", "skipped")]
        result.score = score_of(trial_file.targets[search.objective]) if not failed else None
        if failed or result.score is None:
            result.status = "failed"
            result.error = "; ".join(r.error or "; ".join(r.reasons) for r in failed) or "no score was stored"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, result.score)
        target_plan = the_plan.targets.get(search.name)
        if target_plan is not None:
            task_keys = [task.key for task in target_plan.tasks]
            result.shared = sum(1 for key in task_keys if key in seen)
            seen.update(key for key in task_keys if key)
            result.key = target_plan.key
        result.output_digest = output_digest(trial_file.targets[search.name].output)
        results.append(result)
        on_trial(result)
    return results


def _divides(step: float, span: float) -> bool:
    """Whether `span` is a whole number of `step`s, within float rounding (0.1 divides 0.6)."""
    count = round(span / step)
    return count >= 1 and abs(count * step - span) <= 1e-9 * max(1.0, abs(span))


def _optuna(sampler: str):
    try:
        import optuna
    except ImportError:
        raise MbuildError("mbuild search needs Optuna: pip install 'mbuild[search]' (or pip install optuna)") from None
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise MbuildError("the cmaes sampler needs the cmaes package: pip install cmaes") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def output_digest(folder: Path) -> str | None:
    """One digest of a built model's tensors (their names and digests, from its manifest)."""
    manifest = io.read_manifest(folder)
    if not manifest:
        return None
    tensors = manifest.get("tensors", {})
    return keys.digest(sorted((name, entry.get("digest")) for name, entry in tensors.items()))


def best_trial(search: Search, results: list[TrialResult]) -> TrialResult | None:
    """The best scored trial (the first of equals); None when every trial failed."""
    scored = [r for r in results if r.status == "done" and r.score is not None]
    if not scored:
        return None
    pick = min if search.direction == "minimize" else max
    return pick(scored, key=lambda r: r.score)


# ---------------------------------------------------------------------------------------------
# --apply


def apply(search: Search, mergefile: Mergefile, best: TrialResult) -> tuple[Path, bool]:
    """Write the best recipe as the target NAME-best; (the file written, whether it is the Mergefile).

    A text edit: the target's lines go after the searched target's (or replace an earlier
    NAME-best's), every other line of the file stays as written. If the Mergefile changed
    since the search read it, or the edit would not read back as that target, the recipe is
    written beside it (``Mergefile.NAME-best.yaml``) instead and the Mergefile is left alone.
    """
    import yaml

    body = with_values(search.body, best.values)
    body.pop("output", None)  # the default, build/NAME-best: never the searched target's folder
    header = (f"# best of {search.trials} trials of 'mbuild search {search.name}': "
              f"{search.objective} = {best.score:.6g} ({search.direction})")
    block = yaml.safe_dump({search.best_name: body}, sort_keys=False, default_flow_style=None, width=100)
    current = io.read_small_file(mergefile.path, MERGEFILE_LIMIT, MergefileError).decode("utf-8")
    edited = _edited_text(search, current, header, block) if current == search.text else None
    if edited is not None and _reads_back(edited, mergefile.path, search.best_name, body):
        io.replace_text(mergefile.path, edited)
        return mergefile.path, True
    beside = mergefile.path.with_name(f"{mergefile.path.name}.{search.best_name}.yaml")
    io.replace_text(beside, f"{header}\n# add under 'targets:' of {mergefile.path.name}\n{block}")
    return beside, False


def _edited_text(search: Search, text: str, header: str, block: str) -> str | None:
    """The Mergefile's text with the NAME-best block in place; None if its layout is not block style."""
    lines = text.splitlines(keepends=True)
    starts = sorted(line for path, line in search.lines.items() if len(path) == 2 and path[0] == "targets")
    tops = sorted(line for path, line in search.lines.items() if len(path) == 1)
    start = search.lines[("targets", search.name)]
    indent = re.match(r"[ \t]*", lines[start - 1]).group(0)
    if not lines[start - 1][len(indent):].startswith(f"{search.name}:"):
        return None  # a flow-style mapping: no line of its own to insert after
    replaced = search.lines.get(("targets", search.best_name))
    anchor = replaced if replaced is not None else start
    end = _block_end(lines, anchor, starts, tops)
    new = [indent + line + "\n" for line in [header, *block.splitlines()]]
    if replaced is not None:
        begin = replaced - 1
        if begin > 0 and lines[begin - 1].lstrip().startswith("# best of"):
            begin -= 1  # the header an earlier --apply wrote
        return "".join(lines[:begin] + new + lines[end:])
    if end > 0 and not lines[end - 1].endswith("\n"):
        lines[end - 1] += "\n"
    return "".join(lines[:end] + new + lines[end:])


def _block_end(lines: list[str], start: int, starts: list[int], tops: list[int]) -> int:
    """The index after a target's last written line (trailing blank and comment lines excluded)."""
    following = [line for line in starts + tops if line > start]
    end = (min(following) - 1) if following else len(lines)
    while end > start and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    return end


def _reads_back(text: str, path: Path, name: str, body: Mapping[str, Any]) -> bool:
    """Whether the edited text parses, and holds target ``name`` with exactly ``body``."""
    from mbuild import mergefile as mergefile_module

    try:
        data, _ = load_yaml(text, path)
        mergefile_module.parse(text, path)
    except MergefileError:
        return False
    return isinstance(data.get("targets"), dict) and data["targets"].get(name) == body

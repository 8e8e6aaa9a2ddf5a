"""Parse a Mergefile (YAML) and validate it into typed, frozen recipes.

A Mergefile maps target names to merge recipes. A recipe body is a mergekit
merge config (``merge_method``, ``models``/``slices``, ``base_model``,
``parameters``, ``dtype`` ...) plus mbuild's own ``output`` and ``seed``.
Everything here works from the text alone: checks that need model metadata
(shapes, layer counts) happen in :mod:`mbuild.plan`.

`load` and `parse` are the way in; the modules below each hold one step, and each
imports only those listed before it:

- `recipe`: the frozen dataclasses a Mergefile becomes (`Mergefile`, `Target` and
  `ModelRef` are also named here);
- `yaml_loading`: YAML text to plain values with the line of each, within size bounds;
- `values`: checks of single values (keys, dtypes, layer ranges, parameters);
- `references`: what a model string means (a target, a folder or a hub repository);
- `checker`: the walk over each target's body that builds its `Target`;
- `matrix`: sweeps, a target with `matrix:` checked as one target per combination;
- `outputs`: the check that no output can replace what is not its own;
- `dependencies`: the graph of targets and sources, refused when it has a cycle;
- `importer`: mergekit configs turned into Mergefile text; it builds on `parse`, so it
  is imported as `mbuild.mergefile.importer` and nothing here imports it.
"""

from __future__ import annotations

from pathlib import Path

from mbuild import io
from mbuild.errors import Location, MergefileError
from mbuild.mergefile import matrix
from mbuild.mergefile.checker import RECIPE_KEYS, Checker
from mbuild.mergefile.dependencies import build_graph
from mbuild.mergefile.outputs import check_outputs
from mbuild.mergefile.recipe import NAME_LIMIT, TARGET_NAME, TOP_LEVEL_KEYS, Mergefile, ModelRef, Target
from mbuild.mergefile.yaml_loading import MERGEFILE_LIMIT, load_yaml

__all__ = [
    "MERGEFILE_LIMIT",
    "NAME_LIMIT",
    "RECIPE_KEYS",
    "TARGET_NAME",
    "TOP_LEVEL_KEYS",
    "Mergefile",
    "ModelRef",
    "Target",
    "build_graph",
    "check_outputs",
    "load",
    "parse",
]


def load(path: str | Path) -> Mergefile:
    """Read and validate a Mergefile; raise MergefileError naming file, line and target."""
    path = Path(path).absolute()
    try:
        data = io.read_small_file(path, MERGEFILE_LIMIT, MergefileError)
    except FileNotFoundError:
        raise MergefileError(f"no Mergefile at {path}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise MergefileError("the Mergefile is not UTF-8 text", Location(path, line)) from None
    return parse(text, path)


def parse(text: str, path: Path) -> Mergefile:
    """Validate Mergefile text; ``path`` anchors relative model folders and messages."""
    spellings: dict[tuple, str] = {}
    data, lines = load_yaml(text, path, spellings)
    lines = dict(lines)
    targets: dict[str, Target] = {}
    mergefile = Mergefile(path=path, targets=targets, lines=lines)
    checker = Checker(mergefile)
    if not isinstance(data, dict):
        raise MergefileError("a Mergefile is a mapping with a 'targets:' key", Location(path, 1))
    checker.unknown_keys(data, TOP_LEVEL_KEYS, ())
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise checker.error(("defaults",), "'defaults' must be a mapping of recipe keys")
    checker.unknown_keys(defaults, RECIPE_KEYS, ("defaults",))
    bodies = data.get("targets")
    if not isinstance(bodies, dict) or not bodies:
        raise checker.error(("targets",), "the Mergefile needs a non-empty 'targets:' mapping")
    for name in bodies:
        if not isinstance(name, str) or not TARGET_NAME.match(name) or name in ("all",):
            raise checker.error(
                ("targets", name),
                f"invalid target name {name!r}: use letters, digits, '_', '-', '.' (and not 'all')",
            )
        if len(name) > NAME_LIMIT:
            raise checker.error(("targets", name), f"target name of {len(name)} characters: at most {NAME_LIMIT}")
    matrix.check_targets(checker, bodies, defaults, spellings)  # each sweep as its points
    for target in targets.values():
        for ref in target.references():
            unread = _unreadable(targets[ref.location]) if ref.kind == "target" else None
            if unread is not None:
                raise MergefileError(
                    f"'{ref}' is {unread}, which no other target reads", Location(mergefile.path, ref.line, target.name)
                )
    check_outputs(mergefile)
    return mergefile


def _unreadable(target: Target) -> str | None:
    """What a target is and makes, when its output is no model another target can read."""
    if target.gguf is not None:
        return "a GGUF target: its output is a .gguf file"
    if target.extract_lora is not None:
        return "a LoRA extraction target: its output is an adapter"
    if target.evaluation is not None:
        return "an eval target: its output is a score"
    return None

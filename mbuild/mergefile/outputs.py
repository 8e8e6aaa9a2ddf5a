"""Where targets write: the check that no output can replace or delete what is not its own.

Kept apart from the text checks because it compares resolved paths on disk across every
target of the Mergefile at once, after each target has been checked on its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from mbuild.errors import MergefileError
from mbuild.mergefile.recipe import NAME_LIMIT, Mergefile


def check_outputs(mergefile: Mergefile) -> None:
    """Refuse any output that could replace or delete what is not its own.

    Compared as resolved paths (`out/y/../x` is `out/x`, links followed): an output must be
    a folder or nothing yet, not a link; no two targets may share one or nest one inside the
    other; none may be, hold or lie inside a local source model; none may hold the Mergefile.
    """

    def real(path: Path) -> Path:
        return Path(os.path.realpath(path))

    def inside(inner: Path, outer: Path) -> bool:
        return inner == outer or outer in inner.parents

    mergefile_file = real(mergefile.path)
    # Every local model any target reads: one target's output must not overlap another's source.
    sources = {
        ref.text: real(Path(ref.location))
        for target in mergefile.targets.values()
        for written in target.references()
        for ref in written.lora or (written,)  # a LoRA reference reads its base and its adapter
        if ref.kind == "local"
    }
    resolved: dict[str, Path] = {}
    for name, target in mergefile.targets.items():
        output = target.output
        where = target.location("output")
        for part in output.parts:
            if len(os.fsencode(part)) > NAME_LIMIT:
                raise MergefileError(
                    f"output {output}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long, at most {NAME_LIMIT}",
                    where,
                )
        if output.is_symlink():
            raise MergefileError(f"output {output} is a symbolic link: name the real folder in 'output:'", where)
        if output.exists() and not output.is_dir():
            raise MergefileError(
                f"output {output} exists and is not a folder: mbuild never replaces a file; choose another 'output:'",
                where,
            )
        path = real(output)
        if inside(mergefile_file, path):
            raise MergefileError(
                f"output {output} would hold the Mergefile {mergefile.path}: give the target a folder of its own",
                where,
            )
        for other, other_path in resolved.items():
            if path == other_path:
                raise MergefileError(
                    f"output folder {output} is also target '{other}''s: give each target its own 'output:'", where
                )
            if inside(path, other_path) or inside(other_path, path):
                outer, inner = (other, name) if inside(path, other_path) else (name, other)
                raise MergefileError(
                    f"output of target '{inner}' lies inside the output of target '{outer}' ({output}): "
                    "outputs must not nest",
                    where,
                )
        for text, source in sources.items():
            if inside(path, source) or inside(source, path):
                raise MergefileError(
                    f"output {output} overlaps the source model '{text}' ({source}): "
                    "an output must never be, hold or lie inside a model it reads",
                    where,
                )
        resolved[name] = path

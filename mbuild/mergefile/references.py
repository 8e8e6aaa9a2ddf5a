"""What a model written in a recipe means: a target name wins, then a local folder, then the hub;
``base+adapter`` (mergekit's syntax) is a base model with a PEFT LoRA adapter applied.

Kept apart because it is the rule every model reference goes through, and the importer
reads mergekit's references by the same hub ID pattern.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from mbuild.mergefile.recipe import ModelRef
from mbuild.mergefile.values import ValueChecker, suggest
from mbuild.nodes import LORA, Node

ADAPTER_CONFIG = "adapter_config.json"
# A hub repository, ORG/NAME (`mbuild push --repo` takes the same).
HUB_REPO = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
HUB_ID = re.compile(rf"^{HUB_REPO}(@[\w.\-/]+)?$")


class ReferenceResolver:
    """Decides what each model string means: a target name wins, then a folder, then the hub."""

    def __init__(self, checker: ValueChecker, target_names: "set[str] | Mapping[str, str]"):
        self.checker = checker
        self.target_names = target_names

    def resolve(self, value: Any, path: tuple) -> ModelRef:
        line = self.checker.mergefile.location(path).line
        if not isinstance(value, str) or not value.strip():
            raise self.checker.error(path, f"a model reference must be a non-empty string, not {value!r}")
        text = value.strip()
        if text in self.target_names:
            # A mapping of names stands a sweep's name for one of its points (`matrix`).
            name = self.target_names[text] if isinstance(self.target_names, Mapping) else text
            return ModelRef(name, "target", name, None, line, Node.target(name))
        folder = Path(os.path.normpath(self.checker.mergefile.folder / Path(text).expanduser()))
        if "+" in text and not folder.exists():
            return self._lora(text, path, line)
        return self._model(text, path, line)

    def _lora(self, text: str, path: tuple, line: int | None) -> ModelRef:
        """``base+adapter``: each side a folder or a hub ID; the adapter as PEFT saves it."""
        parts = text.split("+")
        if len(parts) != 2 or not all(part.strip() for part in parts):
            raise self.checker.error(path, f"'{text}': a LoRA reference is 'MODEL+ADAPTER', one '+' between two models")
        base, adapter = (self._model(part.strip(), path, line, role) for part, role in zip(parts, ("base model", "adapter")))
        if adapter.kind == "local" and not (Path(adapter.location) / ADAPTER_CONFIG).is_file():
            raise self.checker.error(
                path, f"'{text}': the adapter {adapter.location} has no {ADAPTER_CONFIG} (a folder PEFT's save_pretrained wrote)"
            )
        node = Node.of(LORA, f"{base.node}+{adapter.node}")
        return ModelRef(text, LORA, text, None, line, node, (base, adapter))

    def _model(self, text: str, path: tuple, line: int | None, role: str | None = None) -> ModelRef:
        """A folder or a hub ID; a target name too unless ``role`` names a side of a LoRA reference."""
        if role is not None and text in self.target_names:
            raise self.checker.error(path, f"'{text}': the {role} of a LoRA reference must be a folder or a hub ID, not a target")
        folder = Path(os.path.normpath(self.checker.mergefile.folder / Path(text).expanduser()))
        if folder.exists():
            if not folder.is_dir():
                raise self.checker.error(path, f"model '{text}' is a file, not a model folder ({folder.absolute()})")
            absolute = Path(os.path.normpath(folder.absolute()))
            try:
                shown = absolute.relative_to(self.checker.mergefile.folder).as_posix()
            except ValueError:
                shown = absolute.as_posix()
            return ModelRef(text, "local", str(absolute), None, line, Node.of("local", shown))
        looks_local = text.startswith((".", "/", "~")) or not HUB_ID.match(text)
        if looks_local:
            hint = suggest(text, sorted(self.target_names))
            raise self.checker.error(
                path,
                f"model '{text}' not found: no folder {folder.absolute()} and no target of that name{hint}",
            )
        repo, _, revision = text.partition("@")
        if revision and any(part in ("", ".", "..") for part in revision.split("/")):
            # huggingface_hub finds a branch's commit in the file refs/<revision> of its cache.
            raise self.checker.error(path, f"'{text}': a revision is a branch, tag or commit, never a path with '.', '..' or '//'")
        return ModelRef(text, "hub", repo, revision or None, line, Node.of("hub", f"{repo}@{revision or 'main'}"))

"""Mergefile YAML read into plain values, with the line of every mapping key and list item.

Separate from the checks because it knows nothing of recipes: it bounds what a file may
cost to read (size, nesting, aliases) and remembers lines, and the importer reads mergekit
configs through it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mbuild.errors import Location, MergefileError

# A real Mergefile is a few KB with a few hundred YAML nodes, nested a dozen deep: these
# bounds only stop a hostile or runaway one (YAML aliases of aliases multiply without end).
MERGEFILE_LIMIT = 1024 * 1024
YAML_NODE_LIMIT = 100_000
YAML_DEPTH_LIMIT = 64


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a duplicate target is a silent overwrite in YAML)."""


def load_yaml(text: str, path: Path, spellings: dict[tuple, str] | None = None) -> tuple[Any, dict[tuple, int]]:
    """Load YAML and remember the 1-based line of every mapping key and list item.

    With ``spellings``, it is filled with the text of every scalar as written (``0.30``,
    ``1e-3``), by path: a sweep names its targets after its values as the user wrote them.
    """
    try:
        check_nesting(text, path)
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(error, "problem", None) or str(error)
        raise MergefileError(f"invalid YAML: {problem}", Location(path, line)) from None
    if node is None:
        raise MergefileError("the Mergefile is empty", Location(path, 1))
    converter = _Converter(text, path)
    if spellings is not None:
        converter.spellings = spellings
    return converter.value(node, (), 0), converter.lines


def check_nesting(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than YAML_DEPTH_LIMIT before composing it: PyYAML composes by recursion."""
    depth = 0
    for event in yaml.parse(text, Loader=_LineLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > YAML_DEPTH_LIMIT:
                line = event.start_mark.line + 1
                raise MergefileError(f"the Mergefile nests deeper than {YAML_DEPTH_LIMIT} levels", Location(path, line))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _Converter:
    """Turns composed YAML nodes into plain values, remembering the line of each key and item.

    An alias is a second reference to one node, and its value is copied wherever it is used:
    the copies are counted and their depth bounded, or a few lines of aliases of aliases would
    expand to billions of values, and an alias used inside itself would recurse without end.
    """

    def __init__(self, text: str, path: Path):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.constructor = _LineLoader(text)
        self.count = 0
        self.spellings: dict[tuple, str] = {}

    def error(self, node: yaml.Node, message: str) -> MergefileError:
        return MergefileError(message, Location(self.path, node.start_mark.line + 1))

    def value(self, node: yaml.Node, where: tuple, depth: int) -> Any:
        self.count += 1
        if self.count > YAML_NODE_LIMIT:
            raise self.error(node, f"the Mergefile expands to more than {YAML_NODE_LIMIT} YAML values (aliases of aliases?)")
        if depth > YAML_DEPTH_LIMIT:
            raise self.error(node, f"the Mergefile nests deeper than {YAML_DEPTH_LIMIT} levels (an alias used inside itself?)")
        if isinstance(node, yaml.ScalarNode):
            self.spellings[where] = node.value
            return self.scalar(node)
        if isinstance(node, yaml.MappingNode) and node.tag == _LineLoader.DEFAULT_MAPPING_TAG:
            return self.mapping(node, where, depth)
        if isinstance(node, yaml.SequenceNode) and node.tag == _LineLoader.DEFAULT_SEQUENCE_TAG:
            return self.sequence(node, where, depth)
        raise self.error(node, f"unsupported YAML tag {node.tag}")

    def mapping(self, node: yaml.MappingNode, where: tuple, depth: int) -> dict:
        result: dict = {}
        merged: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.merge(key_node, value_node, where, depth, merged)
                continue
            key = self.key(key_node)
            if key in result:
                raise self.error(key_node, f"duplicate key '{key}'")
            self.lines[where + (key,)] = key_node.start_mark.line + 1
            result[key] = self.value(value_node, where + (key,), depth + 1)
        for merge_key, merge_value in merged.items():
            result.setdefault(merge_key, merge_value)
        return result

    def merge(self, key_node: yaml.Node, value_node: yaml.Node, where: tuple, depth: int, merged: dict) -> None:
        """`<<: *anchor` (or a list of anchors): keys written beside it win."""
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            value = self.value(source, where, depth + 1)
            if not isinstance(value, dict):
                raise self.error(key_node, "'<<' must merge a mapping")
            for merge_key, merge_value in value.items():
                merged.setdefault(merge_key, merge_value)

    def sequence(self, node: yaml.SequenceNode, where: tuple, depth: int) -> list:
        items = []
        for index, item in enumerate(node.value):
            self.lines[where + (index,)] = item.start_mark.line + 1
            items.append(self.value(item, where + (index,), depth + 1))
        return items

    def key(self, node: yaml.Node) -> Any:
        """A mapping key: a plain value (a list or mapping as a key is never meant in a Mergefile)."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, "a key must be a plain value, not a list or a mapping")
        return self.scalar(node)

    def scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer of too many digits
            raise self.error(node, f"invalid YAML value: {getattr(error, 'problem', None) or error}") from None

"""Turn a mergekit config into Mergefile text: ``mbuild import``.

Three kinds of config come in: a ``mergekit-yaml`` merge config and a ``mergekit-moe`` config
(one YAML document, one target), and a ``mergekit-multi`` config (several documents, each
named by ``name:``, a later one referring to an earlier one by that name). Each document
becomes one target, in order.

The conversion works on the text, not on re-dumped data, so each body keeps the user's keys,
order, quoting and comments. Only three things change:

- a document's ``name:`` entry goes (it becomes the target's key);
- a model reference that names a stage becomes that plain target name (``stage@rev`` →
  ``stage``). mergekit-multi substitutes stage names into *every* string, filters included;
  here only the places where a model stands are looked at, the rest is kept verbatim;
- a relative model folder is rewritten relative to the Mergefile's folder, so it still names
  the same folder. Like mergekit, a relative path is read from the current directory; one
  found only beside the config is read from there.

The produced text is validated with :func:`mbuild.mergefile.parse` before anyone writes it;
a mistake is reported at its line in the *config*, not in the text made from it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mbuild import io
from mbuild.errors import Location, MbuildError, MergefileError, MergefileWarning
from mbuild.mergefile import parse
from mbuild.mergefile.dependencies import build_graph
from mbuild.mergefile.recipe import TARGET_NAME, Mergefile
from mbuild.mergefile.references import HUB_ID
from mbuild.mergefile.yaml_loading import MERGEFILE_LIMIT, check_nesting, load_yaml

# A line that starts or ends a YAML document. YAML forbids these at column 0 inside content,
# block scalars included, so splitting lines on them is exactly how YAML splits documents.
DOCUMENT_MARKER = re.compile(r"^(---|\.\.\.)(?=\s|$)")
DIRECTIVE = re.compile(r"^%(YAML|TAG)\s")
BODY_INDENT = "    "


@dataclass(frozen=True)
class ImportedMergefile:
    """The Mergefile made from a mergekit config: its text, target names and validated parse."""

    text: str
    targets: tuple[str, ...]
    mergefile: Mergefile
    # What the config says that mbuild ignores, as mergekit does, at the config's lines.
    warnings: tuple[MergefileWarning, ...] = ()


@dataclass
class _Document:
    """One YAML document of the config: its lines (text, 1-based source line) and parsed data."""

    lines: list[list]
    data: Any = None
    lines_of: dict | None = None  # data path -> source line, as load_yaml gives
    root: yaml.Node | None = None
    name: str | None = None

    @property
    def first_line(self) -> int:
        """The line of the document's first content (not comment, not blank)."""
        for text, line in self.lines:
            stripped = text.strip()
            if stripped and not stripped.startswith("#"):
                return line
        return self.lines[0][1]


def import_config(
    config: str | Path,
    output: str | Path,
    name: str | None = None,
    working_dir: str | Path | None = None,
) -> ImportedMergefile:
    """Convert a mergekit (yaml, moe or multi) config into validated Mergefile text for ``output``.

    ``name`` names the document without ``name:`` (the single document of a mergekit-yaml or
    mergekit-moe config, mergekit-multi's final merge); by default the config file's stem.
    ``working_dir`` is where mergekit would have run (relative model paths start there);
    by default the current directory.
    """
    config = Path(config).absolute()
    output = Path(output).absolute()
    working_dir = Path(working_dir if working_dir is not None else os.getcwd()).absolute()
    try:
        text = io.read_small_file(config, MERGEFILE_LIMIT, MergefileError).decode("utf-8")
    except FileNotFoundError:
        raise MergefileError(f"no mergekit config at {config}") from None
    except UnicodeDecodeError as error:
        raise MergefileError(f"cannot read {config}: {error}") from None

    documents = _split_documents(text, config)
    _name_documents(documents, config, name)
    stage_names = {document.name for document in documents}
    for document in documents:
        edits = _reference_edits(document, stage_names, config, output.parent, working_dir)
        edits.extend(_name_entry_edits(document))
        _apply_edits(document, edits)

    numbered = [("targets:", None)]
    for document in documents:
        numbered.append((f"  {_yaml_key(document.name)}:", document.first_line))
        body = [(text, line) for text, line in document.lines]
        while body and not body[0][0].strip():
            body.pop(0)
        while body and not body[-1][0].strip():
            body.pop()
        numbered.extend((BODY_INDENT + text if text.strip() else "", line) for text, line in body)
    result = "\n".join(text for text, _ in numbered) + "\n"

    def in_config(location: Location | None) -> Location:
        """Where the user wrote what is at ``location`` in the made text: the config's line."""
        line = numbered[location.line - 1][1] if location is not None and location.line else None
        return Location(config, line, location.target if location is not None else None)

    try:
        parsed = parse(result, output)
        build_graph(parsed)  # a cycle between stages, which parsing alone lets through
    except MergefileError as error:
        raise MergefileError(error.message, in_config(error.location)) from None
    warnings = tuple(MergefileWarning(warning.message, in_config(warning.location)) for warning in parsed.warnings)
    return ImportedMergefile(result, tuple(document.name for document in documents), parsed, warnings)


def _split_documents(text: str, config: Path) -> list[_Document]:
    """Split the config into documents by their markers; parse each with its source lines."""
    # yaml itself first, so a mistake is reported as YAML sees it, over the whole file.
    try:
        check_nesting(text, config)
        expected = [data for data in yaml.safe_load_all(text) if data is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error)
        raise MergefileError(f"invalid YAML: {problem}", Location(config, mark.line + 1 if mark else None)) from None

    chunks: list[list[list]] = [[]]
    for index, line in enumerate(text.splitlines()):
        marker = DOCUMENT_MARKER.match(line)
        if marker:
            chunks.append([])
            if marker.group(1) == "---":
                # Blank the marker, keeping columns: what follows it belongs to the document.
                rest = line[3:]
                comment = rest.strip().startswith("#")
                chunks[-1].append([rest.strip() if comment else "   " + rest, index + 1])
            continue
        chunks[-1].append(["" if DIRECTIVE.match(line) else line, index + 1])

    documents: list[_Document] = []
    pending: list[list] = []  # comment-only chunks join the next document, keeping comments
    for chunk in chunks:
        if all(not text.strip() or text.strip().startswith("#") for text, _ in chunk):
            pending.extend(chunk)
            continue
        documents.append(_Document(pending + chunk))
        pending = []
    if not documents:
        raise MergefileError("the config holds no merge configuration", Location(config, 1))
    documents[-1].lines.extend(pending)

    for document in documents:
        last = document.lines[-1][1]
        padded = [""] * last
        for text, line in document.lines:
            padded[line - 1] = text
        source = "\n".join(padded) + "\n"
        # Placed at their own lines, so every line and mark below is the config's.
        try:
            document.data, document.lines_of = load_yaml(source, config)
        except yaml.YAMLError as error:  # what mbuild's loader does not construct, such as '<<' merge keys
            mark = getattr(error, "problem_mark", None)
            problem = getattr(error, "problem", None) or str(error)
            raise MergefileError(f"unsupported YAML: {problem}", Location(config, mark.line + 1 if mark else None)) from None
        document.root = yaml.compose(source, Loader=yaml.SafeLoader)
    if [document.data for document in documents] != expected:
        raise MergefileError("cannot split the config into its YAML documents", Location(config, None))
    return documents


def _name_documents(documents: list[_Document], config: Path, name: str | None) -> None:
    """Give each document its target name: its ``name:``, else ``name`` or the file's stem."""
    seen: dict[str, int] = {}
    unnamed: list[_Document] = []
    for number, document in enumerate(documents, start=1):
        data = document.data
        where = Location(config, document.first_line)
        if not isinstance(data, dict):
            raise MergefileError(f"document {number} is not a mapping: not a mergekit merge or MoE config", where)
        if "name" in data:
            stage = data["name"]
            line = document.lines_of[("name",)]
            if not isinstance(stage, str):
                raise MergefileError(
                    f"stage name {stage!r} is not a string: quote it (name: \"{stage}\")", Location(config, line)
                )
            if not _is_target_name(stage):
                raise MergefileError(
                    f"stage name {stage!r} cannot be a target name: use letters, digits, '_', '-', '.' (and not 'all')",
                    Location(config, line),
                )
            if stage in seen:
                raise MergefileError(
                    f"duplicate stage name '{stage}' (first at line {seen[stage]})", Location(config, line, stage)
                )
            seen[stage] = line
            document.name = stage
        else:
            unnamed.append(document)
        if "merge_method" not in data and "experts" not in data:
            raise MergefileError(
                f"document {number} has neither 'merge_method' nor 'experts': not a mergekit merge or MoE config",
                Location(config, document.first_line, document.name),
            )
    if len(unnamed) > 1:
        raise MergefileError(
            f"documents at lines {', '.join(str(d.first_line) for d in unnamed)} have no 'name:': "
            "only one (mergekit-multi's final merge) may go without",
            Location(config, unnamed[1].first_line),
        )
    if name is not None and not unnamed:
        raise MbuildError(f"--name {name}: every document of {config} already has a 'name:'")
    if name is not None and not _is_target_name(name):
        raise MbuildError(f"--name {name!r} cannot be a target name: use letters, digits, '_', '-', '.' (and not 'all')")
    for document in unnamed:
        document.name = name if name is not None else _name_from_stem(config.stem)
        if document.name in seen:
            raise MergefileError(
                f"the document without 'name:' would be target '{document.name}', which a stage at line "
                f"{seen[document.name]} already is: give it another with --name",
                Location(config, document.first_line),
            )


def _is_target_name(name: str) -> bool:
    return bool(TARGET_NAME.match(name)) and name != "all"


def _name_from_stem(stem: str) -> str:
    """A valid target name from a file stem: other characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip(".-")
    return name if _is_target_name(name) else "merge"


def _yaml_key(name: str) -> str:
    """The target name as a YAML key that loads back as that string ('1.5', 'true' are quoted)."""
    return name if yaml.safe_load(name) == name else "'" + name.replace("'", "''") + "'"


def _reference_paths(data: dict) -> list[tuple]:
    """Where a model stands in a merge or MoE config (mergekit's ModelReference fields)."""
    paths: list[tuple] = [("base_model",)]
    if data.get("tokenizer_source") not in ("base", "union"):
        paths.append(("tokenizer_source",))
    for index, entry in enumerate(_list(data.get("models"))):
        paths.append(("models", index) if isinstance(entry, str) else ("models", index, "model"))
    for index, output_slice in enumerate(_list(data.get("slices"))):
        if isinstance(output_slice, dict):
            paths.append(("slices", index, "base_model"))
            for source in range(len(_list(output_slice.get("sources")))):
                paths.append(("slices", index, "sources", source, "model"))
    for key in ("experts", "shared_experts"):
        for index in range(len(_list(data.get(key)))):
            paths.append((key, index, "source_model"))
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        if tokenizer.get("source") not in ("base", "union"):
            paths.append(("tokenizer", "source"))
        tokens = tokenizer.get("tokens")
        for token, rule in (tokens.items() if isinstance(tokens, dict) else ()):
            source = rule.get("source") if isinstance(rule, dict) else None
            if isinstance(source, dict):
                paths.append(("tokenizer", "tokens", token, "source", "model"))
            else:
                paths.append(("tokenizer", "tokens", token, "source"))
    return paths


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _reference_edits(document: _Document, stage_names: set, config: Path, folder: Path, working_dir: Path) -> list:
    """Edits turning each model reference into what it means from the Mergefile's folder."""
    edits = []
    for path in _reference_paths(document.data):
        value = _value_at(document.data, path)
        if not isinstance(value, str):
            continue
        try:
            replacement = _rewrite_reference(value, stage_names, config.parent, folder, working_dir)
        except LookupError as error:
            raise MergefileError(str(error), Location(config, document.lines_of.get(path), document.name)) from None
        if replacement is None:
            continue
        node = _node_at(document.root, path)
        edits.append((node.start_mark, node.end_mark, _scalar_text(replacement, node.style)))
    return edits


def _rewrite_reference(value: str, stage_names: set, config_folder: Path, folder: Path, working_dir: Path) -> str | None:
    """The reference as the Mergefile must write it, or None to keep it as written.

    Raises LookupError for a relative folder found nowhere that cannot be a hub ID.
    """
    if value.count("+") == 1:
        # mergekit's 'model+lora': each side rewritten as a model is (a LoRA's base is never a stage).
        sides = value.split("+")
        try:
            rewritten = [_rewrite_reference(side, set(), config_folder, folder, working_dir) for side in sides]
        except LookupError as error:
            raise LookupError(f"'{value}': {error.args[0]}") from None
        if rewritten == [None, None]:
            return None
        return "+".join(new or old for new, old in zip(rewritten, sides))
    # mergekit reads 'path@revision' and finds a stage or a folder by its path alone.
    path = value.split("@")[0] if value.count("@") == 1 else value
    if path in stage_names:
        return path if path != value else None
    if os.path.isabs(path) or path.startswith("~"):
        return path if path != value and Path(path).expanduser().exists() else None
    for start in (working_dir, config_folder):
        found = Path(os.path.normpath(start / path))
        if found.exists():
            break
    else:
        if value.startswith(".") or not HUB_ID.match(value):
            also = f" (nor {config_folder / path})" if config_folder != working_dir else ""
            raise LookupError(f"model '{value}' not found: no folder {working_dir / path}{also} and no stage of that name")
        return None  # a hub ID
    if path == value and Path(os.path.normpath(folder / path)) == found:
        return None
    relative = Path(os.path.relpath(found, folder)).as_posix()
    # A folder must not read as a stage name (mbuild resolves target names first).
    return "./" + relative if relative in stage_names else relative


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _node_at(node: yaml.Node, path: tuple) -> yaml.Node:
    for part in path:
        if isinstance(node, yaml.MappingNode):
            node = next(value for key, value in node.value if key.value == part)
        else:
            node = node.value[part]
    return node


def _scalar_text(value: str, style: str | None) -> str:
    """A YAML scalar that loads as ``value``, in the user's quoting where it can be."""
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style is None and re.fullmatch(r"[A-Za-z0-9_./~][A-Za-z0-9_./~@+\-]*", value) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def _name_entry_edits(document: _Document) -> list:
    """The edit that removes the document's ``name:`` entry (its key becomes the target's)."""
    root = document.root
    if "name" not in document.data:
        return []
    index = next(i for i, (key, _) in enumerate(root.value) if key.value == "name")
    key, value = root.value[index]
    if root.flow_style:
        if index + 1 < len(root.value):
            return [(key.start_mark, root.value[index + 1][0].start_mark, "")]
        return [(root.value[index - 1][1].end_mark, value.end_mark, "")]
    # Block style: the entry owns whole lines (a trailing comment goes with it).
    first = key.start_mark.line
    last = value.end_mark.line if value.end_mark.column > 0 else value.end_mark.line - 1
    return [("lines", first, max(first, last))]


def _apply_edits(document: _Document, edits: list) -> None:
    """Apply replacements and line removals, last first, keeping each line's source line."""
    rows = {line: position for position, (_, line) in enumerate(document.lines)}

    def order(edit):
        if edit[0] == "lines":
            return (edit[1], 0)
        return (edit[0].line, edit[0].column)

    for edit in sorted(edits, key=order, reverse=True):
        if edit[0] == "lines":
            start, end = rows[edit[1] + 1], rows[edit[2] + 1]
            del document.lines[start : end + 1]
            rows = {line: position for position, (_, line) in enumerate(document.lines)}
            continue
        begin, finish, replacement = edit
        first, last = rows[begin.line + 1], rows[finish.line + 1]
        head = document.lines[first][0][: begin.column]
        tail = document.lines[last][0][finish.column :]
        document.lines[first : last + 1] = [[head + replacement + tail, document.lines[first][1]]]
        rows = {line: position for position, (_, line) in enumerate(document.lines)}

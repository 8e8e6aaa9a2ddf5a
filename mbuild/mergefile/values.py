"""Checks of single values in a recipe: keys, dtypes, layer ranges and merge parameters.

`ValueChecker` holds what every check needs (the Mergefile, the target being read) and
reports each mistake at its line; `checker.Checker` walks whole targets on top of it. Kept
apart so the rule for one value is found without reading the walk over a target.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

from mbuild import methods
from mbuild.errors import MergefileError, MergefileWarning
from mbuild.mergefile.recipe import Mergefile

FILTER_KEYS = ("filter", "value")

# Names users write for dtypes, mapped to the canonical torch name.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float64": "float64",
    "fp64": "float64",
}


def suggest(word: str, choices: Iterable[str]) -> str:
    """The hint " (did you mean 'choice'?)" for the choice closest to ``word``; "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class UnreadParameter:
    """A parameter the method does not read where it is written: mergekit still parses its
    setting (a scalar, a gradient or filter rules) before ignoring it, so any well-formed one will do."""

    name: str

    def validate(self, value: Any) -> Any:
        if isinstance(value, (bool, int, float, str)):
            return value
        raise ValueError(f"expected a number, a string or true/false, got {value!r}")


class ValueChecker:
    """Checks one value at a time, failing at the first mistake with its line and target."""

    def __init__(self, mergefile: Mergefile):
        self.mergefile = mergefile
        self.target_name: str | None = None
        # Settings the current target's method does not read: (path, warning), in written order.
        self.ignored: list[tuple[tuple, MergefileWarning]] = []

    def error(self, path: tuple, message: str) -> MergefileError:
        return MergefileError(message, self.mergefile.location(path, self.target_name))

    def ignore(self, path: tuple, message: str) -> None:
        """Note a setting at ``path`` that is ignored, with the warning that says so."""
        self.ignored.append((path, MergefileWarning(message, self.mergefile.location(path, self.target_name))))

    def unknown_keys(self, mapping: dict, allowed: Iterable[str], path: tuple) -> None:
        allowed = tuple(allowed)
        for key in mapping:
            if key not in allowed:
                hint = suggest(str(key), allowed)
                raise self.error((*path, key), f"unknown key '{key}'{hint}")

    def layer_range(self, value: Any, path: tuple) -> tuple[int, int]:
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise self.error(path, f"'layer_range' must be [start, end] (integers, end exclusive), not {value!r}")
        start, end = value
        if start < 0 or end <= start:
            raise self.error(path, f"layer_range [{start}, {end}] is empty or negative: end must be greater than start >= 0")
        return (start, end)

    def dtype(self, value: Any, path: tuple) -> str | None:
        if value is None:
            return None
        canonical = DTYPE_NAMES.get(str(value).lower())
        if canonical is None:
            raise self.error(path, f"unknown dtype '{value}'{suggest(str(value), list(DTYPE_NAMES))}")
        return canonical

    def parameters(self, method, value: Any, path: tuple, per_model: bool | None) -> dict:
        """Check a ``parameters:`` mapping and return the settings ``method`` reads from it.

        ``per_model`` is True under a model or slice source and None at target or slice level
        (both kinds allowed there). mergekit reads only the parameters a method declares, and
        a per-tensor one only from the target's or a slice's parameters; it ignores the rest
        without a word. mbuild ignores the same settings, checked for form and named in a
        warning (`ignore`), but a name no method has is a typo, and refused.
        """
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(path, "'parameters' must be a mapping of parameter names to values")
        read = {}
        for name, setting in value.items():
            try:
                parameter = method.parameter(str(name))
            except KeyError:
                parameter = None
            if parameter is not None and not (per_model and not parameter.per_model):
                self.setting(parameter, setting, (*path, name))
                read[name] = setting
                continue
            if parameter is None and str(name) not in {p.name for m in methods.all_methods() for p in m.parameters}:
                names = [p.name for p in method.parameters]
                hint = suggest(str(name), names) or (
                    f" ({method.name} takes: {', '.join(names)})" if names else f" ({method.name} takes no parameters)"
                )
                raise self.error((*path, name), f"unknown parameter '{name}' for {method.name}{hint}")
            self.setting(UnreadParameter(str(name)), setting, (*path, name))
            if parameter is None:
                names = ", ".join(p.name for p in method.parameters)
                takes = f"it takes: {names}" if names else "it takes no parameters"
                self.ignore(
                    (*path, name), f"{method.name} does not take '{name}' ({takes}): ignored, as mergekit ignores it"
                )
            else:
                self.ignore(
                    (*path, name),
                    f"'{name}' is one value per tensor for {method.name}, read from the target's or a slice's "
                    "parameters, not a model's: ignored here, as mergekit ignores it",
                )
        return read

    def setting(self, parameter, setting: Any, path: tuple) -> None:
        """Check one setting: a scalar, a gradient list, or a list of filter rules."""
        if isinstance(setting, dict):
            setting = [setting]
            singular = True
        else:
            singular = False
        if isinstance(setting, list):
            if not setting:
                raise self.error(path, f"empty list for '{parameter.name}'")
            if all(isinstance(item, dict) for item in setting):
                for index, rule in enumerate(setting):
                    rule_path = path if singular else path + (index,)
                    self.unknown_keys(rule, FILTER_KEYS, rule_path)
                    if "value" not in rule:
                        raise self.error(rule_path, f"filter rule for '{parameter.name}' needs 'value:'")
                    if rule.get("filter") is not None and not isinstance(rule["filter"], str):
                        raise self.error(rule_path + ("filter",), "'filter' must be a string")
                    self.setting(parameter, rule["value"], rule_path + ("value",))
                return
            for index, item in enumerate(setting):
                if isinstance(item, (dict, list)):
                    raise self.error(path + (index,), f"mixed list for '{parameter.name}': give either values (a gradient) or filter rules")
                self.scalar(parameter, item, path + (index,))
            return
        self.scalar(parameter, setting, path)

    def scalar(self, parameter, value: Any, path: tuple) -> None:
        try:
            parameter.validate(value)
        except (ValueError, TypeError) as error:
            raise self.error(path, f"bad value for '{parameter.name}': {error}") from None

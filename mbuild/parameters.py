"""Resolve a parameter setting for one tensor: filters, gradients and precedence.

Semantics follow mergekit's: a setting is a scalar, a gradient (a list of values
interpolated over the layers of a slice, t = 0 at its first layer and 1 at its
last; tensors outside the layer stack take t = 0), or a list of ``filter`` rules
whose first rule matching the tensor name (as a substring; ``*`` or none matches
everything) applies.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from mbuild.methods import REQUIRED, Parameter

UNSET = object()


def evaluate(setting: Any, tensor_name: str, t: float, parameter: Parameter) -> Any:
    """The value a setting gives one tensor at gradient position t, or UNSET if no rule applies."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return parameter.validate(setting)
    if not setting:
        return UNSET
    if all(isinstance(rule, dict) for rule in setting):
        for rule in setting:
            pattern = rule.get("filter")
            if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
                return evaluate(rule["value"], tensor_name, t, parameter)
        return UNSET
    values = [parameter.validate(item) for item in setting]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    position = t * (len(values) - 1)
    low = int(position)
    high = min(len(values) - 1, low + 1)
    fraction = position - low
    return parameter.validate((1 - fraction) * values[low] + fraction * values[high])


def resolve(
    parameter: Parameter,
    scopes: Iterable[Mapping[str, Any] | None],
    tensor_name: str,
    t: float,
) -> Any:
    """The first value any scope (most specific first) gives, else the default.

    Raises KeyError when a required parameter has no value for this tensor.
    """
    for scope in scopes:
        if scope and parameter.name in scope:
            value = evaluate(scope[parameter.name], tensor_name, t, parameter)
            if value is not UNSET and value is not None:
                return value
    if parameter.default is REQUIRED:
        raise KeyError(parameter.name)
    return parameter.default

"""The merge methods: each declared once (name, parameters, defaults, paper) and registered by name.

The Mergefile checker, the planner, the CLI and the engine all read these declarations.
This module and every method module stay free of a module-level torch import, so the
planner can load the registry for a fast no-op build; kernels import torch when they run.

Every kernel has the same signature::

    kernel(tensors, *, base_index, params, model_params, generator) -> torch.Tensor

``tensors`` are the inputs in mergekit's model order (already in the compute dtype, never
modified), ``params`` the resolved global values, ``model_params[i]`` the resolved per-model
values of input ``i``, and ``generator`` the only source of randomness a kernel may use.
A method declared with ``stored_inputs`` is handed its inputs as stored instead, with a
``dtype`` keyword: the compute dtype, which it converts them to a piece at a time. One
declared with ``casts_output`` also takes ``out_dtype`` and returns its result in that
dtype, having checked the compute-dtype values finite (``require_finite``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    import torch


class _Required:
    """The type of REQUIRED: a parameter default meaning "the recipe must give a value"."""

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:
        # Pickle and copy by name, so `default is REQUIRED` still holds in another process.
        return "REQUIRED"


REQUIRED: Any = _Required()

_PARAMETER_TYPES = (float, bool, int, str)
_BASE_POLICIES = ("required", "optional", "ignored")


@dataclass(frozen=True)
class Parameter:
    """One knob of a merge method, with its type, default and allowed range."""

    name: str
    type: type
    per_model: bool
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    applies_to_base: bool = True
    doc: str = ""

    def __post_init__(self) -> None:
        if self.type not in _PARAMETER_TYPES:
            raise ValueError(f"parameter {self.name!r}: type must be float, bool, int or str, not {self.type!r}")
        if self.default is not REQUIRED and self.default is not None:
            self.validate(self.default)

    def validate(self, value: Any) -> Any:
        """Return one resolved value checked and coerced to this parameter's type; ValueError if it is not."""
        if value is None and self.default is None:
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {value!r}")
            return value
        # bool is an int subclass in Python, but `weight: true` is a mistake, not 1.
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"expected a whole number, got {value!r}")
            value = int(value)
        else:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"expected a finite number, got {value!r}")
        self._check_range(value)
        return value

    def _check_range(self, value: float) -> None:
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                allowed = f"from {low:g} to {high:g}"
            elif low is not None:
                allowed = f"at least {low:g}"
            else:
                allowed = f"at most {high:g}"
            raise ValueError(f"expected a value {allowed}, got {value:g}")


def map_in_threads(function: Callable[[Any], Any], items, threads: int) -> list:
    """``[function(item) for item in items]``, run on up to ``threads`` threads, in order.

    For work split into fixed pieces whose results do not depend on which thread runs
    them: the bytes are the same for any ``threads``. The first exception is raised.
    """
    items = list(items)
    if threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(function, items))


class NonFiniteResult(ValueError):
    """A kernel's result holds NaN or inf."""


def require_finite(result: "torch.Tensor") -> None:
    """Raise NonFiniteResult if ``result`` holds NaN or inf."""
    import torch

    # A finite sum proves every element finite (NaN and inf propagate); only a
    # non-finite sum, rare, pays for the element-wise check.
    if not math.isfinite(float(result.sum())) and not bool(torch.isfinite(result).all()):
        raise NonFiniteResult("non-finite result")


@dataclass(frozen=True)
class Method:
    """A merge method: its kernel plus everything needed to check and plan a recipe without running it."""

    name: str
    kernel: Callable[..., "torch.Tensor"]
    parameters: tuple[Parameter, ...]
    paper: str
    version: int = 1
    base: str = "ignored"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    summary: str = ""
    # True when output element i depends only on element i of each input (and on scalars):
    # the engine may then run the kernel a slice at a time, converting only that slice to the
    # compute dtype, for the same bytes with a fraction of the memory.
    elementwise: bool = False
    # True when the kernel takes its inputs as stored plus `dtype=` (the compute dtype) and
    # converts pieces as it reads them, rather than whole float32 copies made up front.
    stored_inputs: bool = False
    # Optionally, an `elementwise` kernel's whole-tensor pass in compiled code:
    # one_pass(stored tensors, output, *, compute_dtype, threads, **kernel keywords) fills
    # `output` (in the output dtype) and returns True, or returns False where it does not
    # apply (the engine then runs the kernel in slices), or raises NonFiniteResult.
    one_pass: Callable[..., bool] | None = None
    # True when a `stored_inputs` kernel also takes `out_dtype=` and returns its result in it,
    # checked finite in the compute dtype first (NonFiniteResult): no compute-dtype copy of
    # the whole result is made, and no second pass converts it.
    casts_output: bool = False
    # True when the kernel takes `threads=`: how many threads it may split work between,
    # where the split cannot change a byte (torch itself runs single-threaded in tasks).
    threaded: bool = False
    # Optionally, a rule over one input's resolved per-model values that no single parameter's
    # range can say (DELLA: density ± epsilon inside (0, 1)): check_input(values) returns why
    # the kernel would refuse them, or None. The planner asks it of every input with values,
    # for every tensor, so the mistake is reported at plan time and not mid-build.
    check_input: Callable[[Mapping[str, Any]], str | None] | None = None
    # Optionally, for a whole-tensor (not `elementwise`) kernel: its working memory beyond the
    # stored inputs and the output, in bytes per element of the output, for m models merged in
    # a compute dtype of `size` bytes: temporaries(m, size), as measured (peak RSS less the
    # process baseline and the inputs' pages, one 32000 x 2048 bfloat16 tensor, torch 2.13 on
    # the CPU, C loops built). None: (2m + 2) tensors of the compute dtype, at or above every
    # measured one. The dry run's peak-memory estimate and the local executor's budget read it.
    temporaries: Callable[[int, int], float] | None = None

    def __post_init__(self) -> None:
        if self.base not in _BASE_POLICIES:
            raise ValueError(f"method {self.name!r}: base must be one of {_BASE_POLICIES}, not {self.base!r}")
        names = [parameter.name for parameter in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r} declares a parameter twice: {names}")
        if self.casts_output and not self.stored_inputs:
            raise ValueError(f"method {self.name!r}: only a stored_inputs method can cast its output")
        if self.one_pass is not None and not self.elementwise:
            raise ValueError(f"method {self.name!r}: only an elementwise method has a one-pass form")
        if self.elementwise and self.random:
            raise ValueError(f"method {self.name!r}: a random method cannot be run in slices (its draws would move)")
        if self.min_models < 1 or (self.max_models is not None and self.max_models < self.min_models):
            raise ValueError(f"method {self.name!r}: bad model count bounds {self.min_models}..{self.max_models}")

    def parameter(self, name: str) -> Parameter:
        """Return the parameter called `name`; KeyError if this method has none."""
        for parameter in self.parameters:
            if parameter.name == name:
                return parameter
        raise KeyError(f"method {self.name!r} has no parameter {name!r}")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` available by name; a second method with the same name is a ValueError."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """Return the method registered as `name`; KeyError if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown merge method {name!r}") from None


def all_methods() -> tuple[Method, ...]:
    """Return every registered method, sorted by name."""
    return tuple(sorted(_REGISTRY.values(), key=lambda method: method.name))


# The built-in families register themselves on import; they need the names defined above.
from mbuild.methods import (  # noqa: E402,F401
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
)

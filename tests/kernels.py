"""Calling a registered method's kernel directly, as the engine does, on small tensors.

Shared by the method tests (`test_methods_*.py`) and the kernel parity tests
(`test_parity_kernels.py`). Values are given per call the way a recipe gives them, per-model
ones as a list over all inputs (None where the base takes none).
"""

from __future__ import annotations

import torch

from mbuild import methods
from mbuild.methods import REQUIRED, Method

# The task-arithmetic family's cases: (method, values) with per-model lists for three
# fine-tunes then the base.
TASK_CASES = [
    ("task_arithmetic", {"weight": [0.3, 0.7, 1.1, None]}),
    ("task_arithmetic", {"weight": [0.3, 0.7, 1.1, None], "normalize": True, "lambda": 0.6}),
    ("task_arithmetic", {"weight": [1.0, -1.0, 0.0, None], "normalize": True}),  # zero total weight
    ("ties", {"weight": [0.5, 0.3, 0.9, None], "density": [0.2, 0.5, 0.9, None]}),
    ("ties", {"weight": [1.0, 1.0, 1.0, None], "density": 0.35, "int8_mask": True}),
    ("ties", {"weight": [0.4, 0.6, 1.2, None], "density": [1.0, 0.0, 0.7, None], "lambda": 1.5}),
    ("ties", {"weight": [0.4, 0.6, 1.2, None], "density": 0.3, "normalize": False, "rescale": True}),
    ("ties", {"weight": [0.5, -0.5, 0.25, None], "density": 0.001}),
]


def resolve(method: Method, count: int, base_index: int | None, values: dict) -> tuple[dict, list[dict]]:
    """Resolve values the way the engine does: defaults filled, per-model lists split by input, base skipped where due."""
    params: dict = {}
    model_params: list[dict] = [{} for _ in range(count)]
    for parameter in method.parameters:
        given = values.get(parameter.name, parameter.default)
        if not parameter.per_model:
            params[parameter.name] = given
            continue
        for index in range(count):
            if index == base_index and not parameter.applies_to_base:
                continue
            value = given[index] if isinstance(given, (list, tuple)) else given
            assert value is not REQUIRED, f"test forgot {parameter.name}"
            model_params[index][parameter.name] = value
    return params, model_params


def merge(name: str, tensors, *, base_index=None, generator=None, dtype=None, **values) -> torch.Tensor:
    """Run a registered kernel on `tensors` with `values` (per-model ones as a list over all inputs).

    `dtype` (methods with stored_inputs only): the compute dtype the kernel converts to.
    """
    method = methods.get(name)
    unknown = set(values) - {parameter.name for parameter in method.parameters}
    assert not unknown, f"{name} has no parameters {sorted(unknown)}"
    params, model_params = resolve(method, len(tensors), base_index, values)
    extra = {"dtype": dtype} if dtype is not None else {}
    return method.kernel(
        tensors, base_index=base_index, params=params, model_params=model_params, generator=generator, **extra
    )


def t(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same dtype and values within a millionth."""
    return actual.dtype == expected.dtype and torch.allclose(actual, expected, rtol=1e-6, atol=1e-6)


def random_models(shape, count, dtype, seed, spread=0.05):
    """A base and `count - 1` fine-tunes of it: the last tensor is the base."""
    generator = seeded(seed)
    base = torch.randn(shape, generator=generator)
    tunes = [base + spread * torch.randn(shape, generator=generator) for _ in range(count - 1)]
    return [x.to(dtype) for x in (*tunes, base)]

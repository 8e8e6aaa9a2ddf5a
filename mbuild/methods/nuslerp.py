"""NuSLERP: spherical interpolation between two models, or between their task vectors over a base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch

# Below this total weight the two models are mixed half and half.
WEIGHT_EPS = 1e-6
# Vectors shorter than this are divided by it instead of their norm.
NORM_EPS = 1e-7
# Where 1 - cos^2 is at most this squared, the vectors are parallel and mixed linearly.
PARALLEL_EPS = 1e-8


def merge_nuslerp(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Slerp from the first model (t=0) to the second (t=1), t being the second's share of the weight."""
    others = [index for index in range(len(tensors)) if index != base_index]
    if len(others) != 2:
        raise ValueError(f"nuslerp needs exactly two models besides the base, got {len(others)}")
    first, second = (tensors[index] for index in others)
    first_weight, second_weight = (model_params[index]["weight"] for index in others)
    total = first_weight + second_weight
    t = 0.5 if abs(total) < WEIGHT_EPS else second_weight / total
    row_wise, flatten = params["nuslerp_row_wise"], params["nuslerp_flatten"]
    if base_index is None:
        return _interpolate(t, first, second, row_wise, flatten)
    base = tensors[base_index]
    return base + _interpolate(t, first - base, second - base, row_wise, flatten)


def _interpolate(t: float, start: torch.Tensor, end: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp vector by vector: the whole tensor (flatten), along dim 0 (row_wise) or along the last dim."""
    import torch

    shape = start.shape
    if flatten:
        start, end = start.reshape(-1), end.reshape(-1)
    elif row_wise:
        start, end = start.transpose(0, -1), end.transpose(0, -1)

    start_unit = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    end_unit = end / torch.linalg.vector_norm(end, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (start_unit * end_unit).sum(dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= PARALLEL_EPS**2
    # acos(1) on the parallel vectors keeps the unused spherical branch finite.
    theta = torch.acos(torch.where(parallel, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * start + torch.sin(t * theta) * end) / torch.sin(theta)
    result = torch.where(parallel, (1 - t) * start + t * end, spherical)

    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


register(
    Method(
        name="nuslerp",
        kernel=merge_nuslerp,
        parameters=(
            Parameter(
                "weight",
                float,
                per_model=True,
                applies_to_base=False,
                doc="relative weight; t is the second model's share of the two",
            ),
            Parameter(
                "nuslerp_row_wise", bool, per_model=False, default=False, doc="interpolate vectors along dim 0"
            ),
            Parameter(
                "nuslerp_flatten", bool, per_model=False, default=True, doc="interpolate the whole tensor as one vector"
            ),
        ),
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp",
        base="optional",
        summary="spherical interpolation of two models, or of their task vectors when a base is given",
    )
)

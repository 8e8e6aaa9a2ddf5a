"""NearSwap: take the other model's value where it is close to the base's, keep the base elsewhere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch

# Distances below this count as this, so equal elements give weight 1 instead of a division by 0.
DISTANCE_EPS = 1e-6


def merge_nearswap(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Per element, move from the base to the other model by min(1, t / |base - other|)."""
    import torch

    if base_index is None or len(tensors) != 2:
        raise ValueError("nearswap needs exactly two inputs, one of them the base model")
    base, other = tensors[base_index], tensors[1 - base_index]
    distance = torch.abs(base - other)
    weight = (params["t"] / distance.clamp(min=DISTANCE_EPS)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


register(
    Method(
        name="nearswap",
        kernel=merge_nearswap,
        parameters=(
            Parameter(
                "t",
                float,
                per_model=False,
                minimum=0.0,
                doc="distance below which the other model's value is taken whole",
            ),
        ),
        paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        base="required",
        min_models=2,
        max_models=2,
        summary="the other model's values where they lie near the base's, interpolated by closeness",
    )
)

"""SCE: select the elements where task vectors vary most, calculate weights from their energy, erase sign conflicts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register
from mbuild.methods.task_arithmetic import agreement_mask

if TYPE_CHECKING:
    import torch

# Below this total energy every task vector gets the same weight.
ENERGY_EPS = 1e-6
# The per-element weight total is at least this, so erased-everywhere elements stay at the base.
DIVISOR_EPS = 1e-6


def merge_sce(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Add to the base the energy-weighted average of the selected task vectors that agree in sign."""
    import torch

    if base_index is None:
        raise ValueError("sce needs a base model")
    base = tensors[base_index]
    others = [index for index in range(len(tensors)) if index != base_index]
    if not others:
        return base.clone()
    mask_dtype = torch.int8 if params["int8_mask"] else base.dtype
    deltas = torch.stack([tensors[index] - base for index in others])

    if params["select_topk"] < 1:
        deltas = deltas * _high_variance_mask(deltas, params["select_topk"], mask_dtype).unsqueeze(0)
    agree = agreement_mask(deltas, "sum", mask_dtype)

    # Each task vector's weight is its mean squared element, as a share of all of them.
    energy = deltas.square().reshape(len(others), -1).mean(dim=1)
    total = torch.sum(energy).item()
    weights = torch.ones_like(energy) / len(others) if abs(total) < ENERGY_EPS else energy / total
    weights = weights.reshape(len(others), *(1,) * base.ndim) * agree
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=DIVISOR_EPS)
    return base + merged


def _high_variance_mask(deltas: torch.Tensor, fraction: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """Mark the `fraction` of elements (of those that vary at all) whose task vectors vary most across models."""
    import torch

    if fraction <= 0:
        return torch.zeros_like(deltas[0], dtype=mask_dtype)
    variance = torch.var(deltas, dim=0, correction=0)
    # The count goes through a float32 product, as mergekit's does (it rounds above 2**24).
    count = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if count == 0:
        return mask
    mask.view(-1)[torch.topk(variance.reshape(-1), k=count, largest=True).indices] = 1
    return mask


register(
    Method(
        name="sce",
        kernel=merge_sce,
        parameters=(
            Parameter(
                "int8_mask", bool, per_model=False, default=False, doc="hold the masks in int8 to save memory"
            ),
            Parameter(
                "select_topk",
                float,
                per_model=False,
                default=1.0,
                minimum=0.0,
                maximum=1.0,
                doc="fraction of varying elements kept, those with the highest variance across models",
            ),
        ),
        paper="https://arxiv.org/abs/2408.07990",
        base="required",
        summary="task vectors selected by variance, weighted by energy, sign conflicts erased (SCE)",
    )
)

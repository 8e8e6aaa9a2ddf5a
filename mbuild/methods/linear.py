"""Linear merge ("model soups"): a weighted average of the inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sum the inputs scaled by their weights, divided by the total weight when `normalize` is on."""
    import torch

    first = tensors[0]
    # Accumulate in float32 even for 16-bit inputs (float64 stays float64), as mergekit does.
    work_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in model_params], dtype=work_dtype, device=first.device)
    # One-element tensors rather than Python scalars: addcmul_ and div_ then round exactly as
    # mergekit's broadcast coefficients do.
    single = (1,) * first.ndim
    total = torch.zeros_like(first, dtype=work_dtype)
    for tensor, weight in zip(tensors, weights.unbind(0)):
        total.addcmul_(tensor, weight.reshape(single))
    if params["normalize"]:
        total.div_(weights.sum().reshape(single))
    return total.to(first.dtype)


register(
    Method(
        name="linear",
        kernel=merge_linear,
        parameters=(
            Parameter("weight", float, per_model=True, doc="scale of this model's tensors"),
            Parameter("normalize", bool, per_model=False, default=True, doc="divide by the sum of the weights"),
        ),
        paper="https://arxiv.org/abs/2203.05482",
        summary="weighted average of the models (model soups)",
        elementwise=True,
    )
)

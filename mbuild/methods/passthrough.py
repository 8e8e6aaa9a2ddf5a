"""Passthrough: copy one input tensor, optionally scaled (the frankenmerge building block)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_passthrough(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Return a copy of the single input, multiplied by its `scale` when one is set."""
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one input, got {len(tensors)}")
    (tensor,) = tensors
    scale = model_params[0].get("scale")
    # A copy, not the input itself: kernels hand back new tensors the engine may own.
    return tensor.clone() if scale is None else tensor * scale


register(
    Method(
        name="passthrough",
        kernel=merge_passthrough,
        parameters=(
            Parameter("scale", float, per_model=True, default=None, doc="multiply the tensor by this factor"),
        ),
        paper="https://github.com/arcee-ai/mergekit#passthrough",
        max_models=1,
        summary="copy one model's tensors unchanged, optionally scaled (layer stacking)",
    )
)

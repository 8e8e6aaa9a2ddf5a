"""Multi-SLERP: a weighted barycentre of several models (or task vectors) on the hypersphere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_multislerp(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Average the unit directions in the tangent space at their weighted mean, map back, restore the norm."""
    import torch

    others = [index for index in range(len(tensors)) if index != base_index]
    if not others:
        raise ValueError("multislerp needs at least one model besides the base")
    if len(others) == 1:
        return tensors[others[0]].clone()
    base = tensors[base_index] if base_index is not None else None
    eps = params["eps"]

    vectors = torch.stack([tensors[index] for index in others])
    if base is not None:
        vectors -= base
    shape = vectors.shape[1:]
    if vectors[0].numel() == 0:
        return torch.empty_like(vectors[0])
    rows = vectors.reshape(len(others), -1)
    weights = torch.tensor([model_params[index]["weight"] for index in others], dtype=rows.dtype, device=rows.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    column = weights.reshape(-1, 1)

    norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    units = rows / (norms + eps)
    mean = (units * column).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise ValueError(
                "multislerp: the weighted directions cancel out (opposite tensors with balancing weights); "
                "change the weights"
            )
        # Two directions that cancel have no spherical mean; mix them linearly instead.
        result = vectors[0] * weights[0] + vectors[1] * weights[1]
        return result if base is None else result + base
    mean = mean / mean_norm

    # Project each direction onto the plane tangent to the sphere at the mean, average there,
    # then follow the great circle from the mean by the length of that average.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * column).sum(0)
    length = torch.linalg.vector_norm(step) + eps
    direction = mean * torch.cos(length) + step * (torch.sin(length) / length)
    result = (direction * (norms.squeeze(-1) * weights).sum()).reshape(shape)
    return result if base is None else result + base


register(
    Method(
        name="multislerp",
        kernel=merge_multislerp,
        parameters=(
            Parameter("weight", float, per_model=True, applies_to_base=False, doc="weight of this model"),
            Parameter(
                "normalize_weights", bool, per_model=False, default=True, doc="divide the weights by their sum"
            ),
            Parameter("eps", float, per_model=False, default=1e-8, minimum=0.0, doc="guard against zero norms"),
        ),
        paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
        base="optional",
        summary="spherical weighted average of any number of models (or task vectors over a base)",
    )
)

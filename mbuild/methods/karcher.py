"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit hypersphere."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_karcher(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Equal-weight Karcher mean of the unit directions by fixed-point iteration, scaled by the mean norm."""
    import torch

    if len(tensors) == 1:
        return tensors[0].clone()
    max_iter, tol = params["max_iter"], params["tol"]
    share = 1.0 / len(tensors)
    # Norms in float32 (float64 stays float64); directions and the iterate stay in the compute dtype.
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(norm_dtype))

    norms = [norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    # Near-zero tensors have no direction: they take no part in the mean, but still in the scale.
    kept = [index for index, n in enumerate(norms) if n.item() > tol]
    if not kept:
        return torch.zeros_like(tensors[0])
    shares = [share for _ in kept]
    total = sum(shares)
    shares = [value / total for value in shares]
    points = [units[index] for index in kept]

    # Start from the normalized Euclidean mean (or the first direction if that vanishes).
    mean = torch.zeros_like(points[0])
    for value, point in zip(shares, points):
        mean += value * point
    length = norm(mean)
    mean = points[0].clone() if length.item() < tol else (mean / length).to(mean.dtype)

    for _ in range(max_iter):
        # Average of the log maps: each point's tangent direction at the mean, times its geodesic distance.
        tangent = torch.zeros_like(mean)
        for value, point in zip(shares, points):
            cos = torch.clamp(torch.dot(mean.flatten(), point.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            tangent += value * (angle / torch.sin(angle)) * (point - cos * mean)
        step = norm(tangent)
        if step.item() < tol:
            break
        # Exponential map: walk the great circle from the mean along the tangent.
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(mean.dtype)
        length = norm(mean)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(share * n for n in norms)
    return scale * mean


register(
    Method(
        name="karcher",
        kernel=merge_karcher,
        parameters=(
            Parameter("max_iter", int, per_model=False, default=10, minimum=0, doc="most fixed-point iterations"),
            Parameter(
                "tol", float, per_model=False, default=1e-5, minimum=0.0, doc="stop when the update is shorter"
            ),
        ),
        paper="https://arxiv.org/abs/2603.04972",
        summary="equal-weight Riemannian (Karcher) mean of the models on the hypersphere, scaled by the mean norm",
    )
)

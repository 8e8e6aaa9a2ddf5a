"""Model Stock: move from the base towards the average of the fine-tunes by a ratio set by their angle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch

# Norm products below this are divided by it instead, so a zero task vector gives cosine 0.
NORM_EPS = 1e-6
# Below this |1 + (k - 1) cos| the ratio has no finite value; the base is kept.
SINGULAR_EPS = 1e-6


def merge_model_stock(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Interpolate base and fine-tune average by t = k cos / (1 + (k - 1) cos), cos the mean pairwise cosine."""
    import torch

    if base_index is None:
        raise ValueError("model_stock needs a base model")
    base = tensors[base_index]
    tunes = [tensor for index, tensor in enumerate(tensors) if index != base_index]
    if len(tunes) < 2:
        raise ValueError(f"model_stock needs at least two models besides the base, got {len(tunes)}")
    shape = base.shape
    # One cosine for the whole tensor, or one per row along the last dim (filter_wise).
    if not params["filter_wise"]:
        base, tunes = base.reshape(-1), [tune.reshape(-1) for tune in tunes]
    elif base.dim() == 1:
        base, tunes = base.unsqueeze(0), [tune.unsqueeze(0) for tune in tunes]

    deltas = [tune - base for tune in tunes]
    cosines = []
    for index, first in enumerate(deltas):
        for second in deltas[index + 1 :]:
            lengths = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / lengths.clamp(min=NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    count = len(tunes)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    ratio = torch.where(
        singular,
        torch.zeros_like(cos),
        (count * cos) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(tunes) / count
    return (ratio * average + (1 - ratio) * base).reshape(shape)


register(
    Method(
        name="model_stock",
        kernel=merge_model_stock,
        parameters=(
            Parameter(
                "filter_wise",
                bool,
                per_model=False,
                default=False,
                doc="one ratio per row (last dimension) instead of one per tensor",
            ),
        ),
        paper="https://arxiv.org/abs/2403.19522",
        base="required",
        min_models=3,
        summary="base moved towards the fine-tunes' average by a ratio from their pairwise angle (Model Stock)",
    )
)

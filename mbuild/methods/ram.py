"""RAM (Reinforced Agent Merging): keep changes only one model made, average those several made.

RAM+ (tensor-local) also scales up each model's unique changes by how much of its change is shared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_ram(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Add to the base each changed element's change, averaged over the models that changed it."""
    if base_index is None:
        raise ValueError("ram needs a base model")
    if len(tensors) == 1:
        return tensors[0].clone()
    changes = _Changes(tensors, base_index, params["epsilon"])
    merged = (changes.kept * changes.unique + changes.averaged_shared()).sum(dim=0, keepdim=True)
    return changes.base + merged.reshape_as(changes.base)


def merge_ramplus_tl(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """RAM, with each model's unique changes scaled by 1 + r * min(alpha, its shared count / unique count)."""
    if base_index is None:
        raise ValueError("ramplus_tl needs a base model")
    if len(tensors) == 1:
        return tensors[0].clone()
    changes = _Changes(tensors, base_index, params["epsilon"])
    shared_counts = (changes.active & changes.shared).sum(dim=1)
    unique_counts = (changes.active & changes.unique).sum(dim=1)
    # The counts become float32 here whatever the compute dtype, and so does the sum below,
    # as in mergekit; the result is rounded to the compute dtype once, at the end.
    overlap = shared_counts / unique_counts.clamp(min=params["epsilon"])
    boost = 1 + params["r"] * overlap.clamp(min=0, max=params["alpha"])
    merged = (changes.kept * changes.unique * boost.unsqueeze(-1) + changes.averaged_shared()).sum(
        dim=0, keepdim=True
    )
    return (changes.base + merged.reshape_as(changes.base)).to(changes.base.dtype)


class _Changes:
    """The task vectors of one tensor, flattened to rows, and which of their elements count as changed."""

    def __init__(self, tensors: Sequence[torch.Tensor], base_index: int, epsilon: float):
        import torch

        self.base = tensors[base_index]
        others = [tensor for index, tensor in enumerate(tensors) if index != base_index]
        deltas = torch.stack([tensor - self.base for tensor in others]).reshape(len(others), -1)
        self.active = deltas.abs() > epsilon
        self.counts = self.active.sum(dim=0, keepdim=True)  # models that changed each element
        self.shared = self.counts > 1
        self.unique = self.counts == 1
        self.kept = deltas * self.active

    def averaged_shared(self) -> torch.Tensor:
        """Each model's changes on elements several models changed, divided by how many did."""
        return self.kept * self.shared / self.counts.clamp(min=1)


_EPSILON = Parameter(
    "epsilon", float, per_model=False, default=1e-5, minimum=0.0, doc="changes this small or smaller do not count"
)

register(
    Method(
        name="ram",
        kernel=merge_ram,
        parameters=(_EPSILON,),
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        summary="changes made by one model kept whole, changes made by several averaged (RAM)",
    )
)

register(
    Method(
        name="ramplus_tl",
        kernel=merge_ramplus_tl,
        parameters=(
            Parameter("r", float, per_model=False, default=0.1, doc="strength of the boost to unique changes"),
            Parameter(
                "alpha", float, per_model=False, default=0.2, minimum=0.0, doc="cap on the shared/unique ratio"
            ),
            _EPSILON,
        ),
        paper="https://arxiv.org/abs/2601.13572",
        base="required",
        summary="RAM with each model's unique changes boosted by how much it shares (RAM+, tensor-local)",
    )
)

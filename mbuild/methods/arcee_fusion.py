"""Arcee Fusion: take the fine-tune's value only where its change from the base is unusually important."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, register

if TYPE_CHECKING:
    import torch

# Added to both softmaxes before the divergence, so zero probabilities give no log(0).
PROBABILITY_EPS = 1e-8
# Above this many elements the quartiles come from this many elements drawn with replacement.
QUANTILE_SAMPLE = 1_000_000
# Outliers by Tukey's rule, from the median: median + 1.5 * (Q3 - Q1).
OUTLIER_SPREAD = 1.5


def merge_arcee_fusion(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Keep the base, except where |change| x KL(fine-tune || base) is an outlier: take the fine-tune there."""
    import torch

    if base_index is None or len(tensors) != 2:
        raise ValueError("arcee_fusion needs exactly two inputs, one of them the base model")
    base, tuned = tensors[base_index], tensors[1 - base_index]
    if base.numel() == 0:
        return base.clone()
    importance = _importance(tuned, base)
    take = (importance >= _outlier_threshold(importance, generator)).float()
    # The float32 mask promotes 16-bit sums to float32 as in mergekit; rounding once at the end
    # then gives the bytes mergekit writes.
    return (base + (tuned - base) * take).to(base.dtype)


def _importance(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tuned - base| per element, times the KL divergence of the rows' softmaxes (along the last dim)."""
    import torch

    tuned_distribution = torch.softmax(tuned, dim=-1) + PROBABILITY_EPS
    base_distribution = torch.softmax(base, dim=-1) + PROBABILITY_EPS
    divergence = torch.sum(
        tuned_distribution * torch.log(tuned_distribution / base_distribution), dim=-1, keepdim=True
    )
    return (tuned - base).abs() * divergence


def _outlier_threshold(importance: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Return median + 1.5 IQR of `importance`, from a sample drawn with `generator` when it is large."""
    import torch

    values = importance.reshape(-1)
    if values.numel() > QUANTILE_SAMPLE:
        if generator is None:
            raise ValueError("arcee_fusion samples large tensors and needs a torch.Generator for that")
        # Drawn where the generator lives and then moved, so one seed picks the same sample everywhere.
        picks = torch.randint(values.numel(), (QUANTILE_SAMPLE,), generator=generator, device=generator.device)
        values = values[picks.to(values.device)]
    ordered = torch.sort(values).values
    # Nearest rank below each quantile, computed in float32 as mergekit does.
    ranks = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    first_quartile, median, third_quartile = ordered[ranks.to(ordered.device)]
    return median + OUTLIER_SPREAD * (third_quartile - first_quartile)


register(
    Method(
        name="arcee_fusion",
        kernel=merge_arcee_fusion,
        parameters=(),
        paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#arcee-fusion",
        base="required",
        min_models=2,
        max_models=2,
        # Tensors above a million elements are judged on a random sample of them.
        random=True,
        summary="the fine-tune's values only where their change from the base is an importance outlier",
    )
)

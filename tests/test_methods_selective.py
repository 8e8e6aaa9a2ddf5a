"""Methods that keep only some of each fine-tune's changes, chosen by a statistic of them: SCE
(variance), RAM and RAM+ (how many models made a change), Arcee Fusion (importance).
"""

from __future__ import annotations

import pytest
import torch

from kernels import close, merge, seeded, t


# ---------------------------------------------------------------------------------------------
# sce


SCE_BASE = t(1.0, 1.0, 1.0, 1.0)
SCE_1 = SCE_BASE + t(1.0, -2.0, 3.0, 0.0)
SCE_2 = SCE_BASE + t(3.0, 1.0, -1.0, 0.0)


def test_sce_energy_weights_and_sign_erasure():
    # summed deltas [4, -1, 2, 0] elect [+, -, +, +]; model 1 agrees at 0, 1, 2; model 2 at 0 only.
    # energies (mean squares) 14/4 = 3.5 and 11/4 = 2.75 give weights 0.56 and 0.44.
    # element 0: (0.56 * 1 + 0.44 * 3) / 1 = 1.88; elements 1, 2: model 1's -2 and 3; element 3: 0
    out = merge("sce", [SCE_1, SCE_2, SCE_BASE], base_index=2)
    assert close(out, SCE_BASE + t(1.88, -2.0, 3.0, 0.0))
    assert torch.equal(merge("sce", [SCE_1, SCE_2, SCE_BASE], base_index=2, int8_mask=True), out)


def test_sce_selects_by_variance():
    # variances [1, 2.25, 4, 0]: 3 vary, select_topk 0.5 keeps int(1.5) = 1, element 2.
    # energies then 9/4 and 1/4: weights 0.9 and 0.1; model 1's +3 wins the vote there
    out = merge("sce", [SCE_1, SCE_2, SCE_BASE], base_index=2, select_topk=0.5)
    assert close(out, SCE_BASE + t(0.0, 0.0, 3.0, 0.0))
    assert torch.equal(merge("sce", [SCE_1, SCE_2, SCE_BASE], base_index=2, select_topk=0.0), SCE_BASE)
    only = merge("sce", [SCE_BASE], base_index=0)
    assert torch.equal(only, SCE_BASE) and only.data_ptr() != SCE_BASE.data_ptr()


# ---------------------------------------------------------------------------------------------
# ram, ramplus_tl


RAM_BASE = torch.zeros(5)
RAM_MODELS = [t(1.0, 0.05, 2.0, 0.0, 4.0), t(3.0, 0.5, 0.0, 0.0, 0.0), t(-1.0, 0.0, 0.0, 0.2, 0.0)]


def test_ram_keeps_unique_and_averages_shared_changes():
    # epsilon 0.1: element 0 changed by all three, (1 + 3 - 1) / 3; the rest by one model each,
    # and model 1's 0.05 does not count as a change
    out = merge("ram", [*RAM_MODELS, RAM_BASE], base_index=3, epsilon=0.1)
    assert close(out, t(1.0, 0.5, 2.0, 0.2, 4.0))
    # with the default epsilon the 0.05 counts: element 1 is shared, (0.05 + 0.5) / 2
    out = merge("ram", [RAM_BASE, *RAM_MODELS], base_index=0)
    assert close(out, t(1.0, 0.275, 2.0, 0.2, 4.0))


def test_ramplus_boosts_unique_changes():
    # shared / unique counts per model: 1/2, 1/1, 1/1. r 0.5, alpha 2: boosts 1.25, 1.5, 1.5
    out = merge("ramplus_tl", [*RAM_MODELS, RAM_BASE], base_index=3, epsilon=0.1, r=0.5, alpha=2.0)
    assert close(out, t(1.0, 0.75, 2.5, 0.3, 5.0))
    # defaults r 0.1, alpha 0.2: every ratio is capped at 0.2, boost 1.02
    out = merge("ramplus_tl", [*RAM_MODELS, RAM_BASE], base_index=3, epsilon=0.1)
    assert close(out, t(1.0, 0.51, 2.04, 0.204, 4.08))
    # bf16 inputs come back bf16 (the boost is float32 inside)
    low = merge("ramplus_tl", [x.bfloat16() for x in (*RAM_MODELS, RAM_BASE)], base_index=3, epsilon=0.1)
    assert low.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# arcee_fusion


def test_arcee_fusion_takes_only_outlier_changes():
    # A 1-D tensor is one softmax row, so importance is |change| times one positive KL divergence,
    # and the threshold median + 1.5 IQR is that same multiple of the changes' own: sorted changes
    # [0, .1, ..., .7, 10] give quartiles 0.2, 0.4, 0.6 and threshold 0.4 + 1.5 * 0.4 = 1.
    base = torch.zeros(9)
    change = t(0.3, 0.0, 0.1, 0.7, 10.0, 0.2, 0.5, 0.4, 0.6)
    out = merge("arcee_fusion", [base, base + change], base_index=0)
    assert torch.equal(out, t(0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0))
    out = merge("arcee_fusion", [base + 1 + change, base + 1], base_index=1)
    assert torch.equal(out, base + 1 + t(0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0))
    # a fine-tune equal to the base changes nothing
    assert torch.equal(merge("arcee_fusion", [change, change], base_index=0), change)


def test_arcee_fusion_samples_large_tensors_from_the_generator():
    generator = seeded(3)
    base = torch.randn(1001, 1000, generator=generator)  # over a million elements
    tuned = base + 0.1 * torch.randn(base.shape, generator=generator) ** 3
    state = torch.get_rng_state()
    first = merge("arcee_fusion", [base, tuned], base_index=0, generator=seeded(1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from
    assert torch.equal(first, merge("arcee_fusion", [base, tuned], base_index=0, generator=seeded(1)))
    taken = first != base
    assert 0.001 < taken.float().mean().item() < 0.2
    assert torch.equal(first[taken], (base + (tuned - base))[taken])
    with pytest.raises(ValueError, match="Generator"):
        merge("arcee_fusion", [base, tuned], base_index=0)

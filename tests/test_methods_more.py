"""Tests for the merge methods beyond linear, SLERP, task arithmetic, TIES and DARE.

Covered: nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion, sce, ram,
ramplus_tl, and the task-arithmetic rows breadcrumbs, breadcrumbs_ties, della, della_linear.
Hand-computed values first; the bit-for-bit comparisons with mergekit sit in their own
section at the end and skip cleanly when mergekit is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

from mbuild import methods
from mbuild.methods import REQUIRED

NEW_METHODS = {
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "ramplus_tl",
    "sce",
}
HALF = math.sqrt(2) / 2


def merge(name: str, tensors, *, base_index=None, generator=None, **values) -> torch.Tensor:
    """Run a registered kernel the way the engine does: defaults filled, per-model lists split by input."""
    method = methods.get(name)
    params: dict = {}
    model_params: list[dict] = [{} for _ in tensors]
    for parameter in method.parameters:
        given = values.pop(parameter.name, parameter.default)
        if not parameter.per_model:
            params[parameter.name] = given
            continue
        for index in range(len(tensors)):
            if index == base_index and not parameter.applies_to_base:
                continue
            value = given[index] if isinstance(given, (list, tuple)) else given
            assert value is not REQUIRED, f"test forgot {parameter.name}"
            model_params[index][parameter.name] = value
    assert not values, f"{name} has no parameters {sorted(values)}"
    return method.kernel(tensors, base_index=base_index, params=params, model_params=model_params, generator=generator)


def t(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.dtype == expected.dtype and torch.allclose(actual, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Declarations


def test_new_methods_are_registered_with_their_families():
    assert NEW_METHODS <= {method.name for method in methods.all_methods()}
    expected = {  # name: (base, min_models, max_models, random)
        "nuslerp": ("optional", 1, None, False),
        "multislerp": ("optional", 1, None, False),
        "karcher": ("ignored", 1, None, False),
        "model_stock": ("required", 3, None, False),
        "nearswap": ("required", 2, 2, False),
        "arcee_fusion": ("required", 2, 2, True),
        "sce": ("required", 1, None, False),
        "ram": ("required", 1, None, False),
        "ramplus_tl": ("required", 1, None, False),
        "breadcrumbs": ("required", 1, None, False),
        "breadcrumbs_ties": ("required", 1, None, False),
        "della": ("required", 1, None, True),
        "della_linear": ("required", 1, None, True),
    }
    for name, declared in expected.items():
        method = methods.get(name)
        assert (method.base, method.min_models, method.max_models, method.random) == declared, name
        assert method.summary and method.paper.startswith("https://"), name


def test_new_parameters_defaults_scopes_and_ranges():
    expected = {  # (method, parameter): (default, per_model, applies_to_base)
        ("nuslerp", "weight"): (REQUIRED, True, False),
        ("nuslerp", "nuslerp_row_wise"): (False, False, True),
        ("nuslerp", "nuslerp_flatten"): (True, False, True),
        ("multislerp", "weight"): (REQUIRED, True, False),
        ("multislerp", "normalize_weights"): (True, False, True),
        ("multislerp", "eps"): (1e-8, False, True),
        ("karcher", "max_iter"): (10, False, True),
        ("karcher", "tol"): (1e-5, False, True),
        ("model_stock", "filter_wise"): (False, False, True),
        ("nearswap", "t"): (REQUIRED, False, True),
        ("sce", "int8_mask"): (False, False, True),
        ("sce", "select_topk"): (1.0, False, True),
        ("ram", "epsilon"): (1e-5, False, True),
        ("ramplus_tl", "r"): (0.1, False, True),
        ("ramplus_tl", "alpha"): (0.2, False, True),
        ("ramplus_tl", "epsilon"): (1e-5, False, True),
        ("breadcrumbs", "gamma"): (0.01, True, False),
        ("breadcrumbs_ties", "gamma"): (0.01, True, False),
        ("della", "epsilon"): (0.15, True, False),
        ("della_linear", "epsilon"): (0.15, True, False),
    }
    for (name, parameter_name), (default, per_model, applies_to_base) in expected.items():
        parameter = methods.get(name).parameter(parameter_name)
        assert parameter.default == default or parameter.default is default, (name, parameter_name)
        assert (parameter.per_model, parameter.applies_to_base) == (per_model, applies_to_base), (name, parameter_name)
    assert methods.get("karcher").parameter("max_iter").type is int
    for name, parameter_name in (("breadcrumbs", "gamma"), ("della", "epsilon"), ("sce", "select_topk")):
        parameter = methods.get(name).parameter(parameter_name)
        assert parameter.validate(0) == 0.0 and parameter.validate(1) == 1.0
        with pytest.raises(ValueError):
            parameter.validate(1.5)
        with pytest.raises(ValueError):
            parameter.validate(-0.1)
    with pytest.raises(ValueError):
        methods.get("nearswap").parameter("t").validate(-0.5)


def test_task_arithmetic_rows():
    expected = {  # name: (normalize, rescale, extra per-model parameter)
        "breadcrumbs": (False, False, "gamma"),
        "breadcrumbs_ties": (False, False, "gamma"),
        "della": (True, True, "epsilon"),
        "della_linear": (False, True, "epsilon"),
    }
    for name, (normalize, rescale, extra) in expected.items():
        method = methods.get(name)
        assert method.parameter("normalize").default is normalize, name
        assert method.parameter("rescale").default is rescale, name
        assert {p.name for p in method.parameters} == {
            "weight", "density", extra, "normalize", "rescale", "lambda", "int8_mask"
        }, name


# ---------------------------------------------------------------------------------------------
# nuslerp


def test_nuslerp_t_is_the_second_models_share():
    a, b = t(2.0, 0.0), t(0.0, 3.0)  # orthogonal: theta = pi/2
    # equal weights, t = 1/2: both coefficients sin(pi/4) / sin(pi/2)
    assert close(merge("nuslerp", [a, b], weight=[1.0, 1.0]), t(2 * HALF, 3 * HALF))
    # weights 1 and 3, t = 3/4: coefficients sin(pi/8) and sin(3pi/8)
    assert close(merge("nuslerp", [a, b], weight=[1.0, 3.0]), t(2 * 0.38268343, 3 * 0.92387953))
    # the weights cancel: t falls back to 1/2
    assert close(merge("nuslerp", [a, b], weight=[1.0, -1.0]), t(2 * HALF, 3 * HALF))


def test_nuslerp_with_a_base_slerps_task_vectors():
    # deltas from [1, 1] are [2, 0] and [0, 3], as above; the base may be listed anywhere
    base, first, second = t(1.0, 1.0), t(3.0, 1.0), t(1.0, 4.0)
    expected = t(1 + 2 * HALF, 1 + 3 * HALF)
    assert close(merge("nuslerp", [first, second, base], base_index=2, weight=[1.0, 1.0, None]), expected)
    assert close(merge("nuslerp", [base, first, second], base_index=0, weight=[None, 1.0, 1.0]), expected)


def test_nuslerp_vector_choice():
    a = t(1.0, 0.0, 1.0, 0.0).reshape(2, 2)
    b = t(0.0, 1.0, 2.0, 0.0).reshape(2, 2)
    # along the last dim: row 0 orthogonal (slerp midpoint), row 1 parallel (lerp: [1.5, 0])
    out = merge("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False)
    assert close(out, t(HALF, HALF, 1.5, 0.0).reshape(2, 2))
    # row_wise, along dim 0: column 0 is [1, 1] vs [0, 2], 45 degrees apart, so both coefficients are
    # sin(pi/8) / sin(pi/4) = 0.5411961; column 1 is zero vs [1, 0]: a zero vector is taken as orthogonal
    out = merge("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    assert close(out, t(0.5411961, HALF, 3 * 0.5411961, 0.0).reshape(2, 2))
    # flattened (the default): one vector; cos = 2 / sqrt(10), so it differs from both
    flat = merge("nuslerp", [a, b], weight=[1.0, 1.0])
    theta = math.acos(2 / math.sqrt(10))
    coefficient = math.sin(theta / 2) / math.sin(theta)
    assert close(flat, (coefficient * (a + b)))


def test_nuslerp_needs_two_models_besides_the_base():
    with pytest.raises(ValueError, match="exactly two"):
        merge("nuslerp", [t(1.0), t(2.0), t(3.0)], weight=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="exactly two"):
        merge("nuslerp", [t(1.0), t(2.0)], base_index=1, weight=[1.0, None])


# ---------------------------------------------------------------------------------------------
# multislerp


def test_multislerp_midpoint_and_norm():
    e1, e2 = t(1.0, 0.0), t(0.0, 1.0)
    assert close(merge("multislerp", [e1, e2], weight=[1.0, 1.0]), t(HALF, HALF))
    # the direction is the same; the length is the weighted mean norm, (3 + 1) / 2
    assert close(merge("multislerp", [3 * e1, e2], weight=[1.0, 1.0]), t(2 * HALF, 2 * HALF))
    # unnormalized weights sum to 2, and so does the length
    assert close(merge("multislerp", [e1, e2], weight=[1.0, 1.0], normalize_weights=False), t(2 * HALF, 2 * HALF))
    # weights 1/4 and 3/4: the weighted mean direction [1, 3] / sqrt(10)
    assert close(merge("multislerp", [e1, e2], weight=[1.0, 3.0]), t(1 / math.sqrt(10), 3 / math.sqrt(10)))


def test_multislerp_with_a_base_and_a_single_model():
    base = t(1.0, 1.0)
    out = merge("multislerp", [t(2.0, 1.0), base, t(1.0, 2.0)], base_index=1, weight=[1.0, None, 1.0])
    assert close(out, t(1 + HALF, 1 + HALF))
    single = t(5.0, -1.0)
    out = merge("multislerp", [single, base], base_index=1, weight=[0.3, None])
    assert torch.equal(out, single) and out.data_ptr() != single.data_ptr()


def test_multislerp_opposite_directions():
    a = t(1.0, 2.0)
    # two that cancel are mixed linearly: 0.5 a + 0.5 (-a)
    assert torch.equal(merge("multislerp", [a, -a], weight=[1.0, 1.0]), t(0.0, 0.0))
    # three that cancel have no answer
    with pytest.raises(ValueError, match="cancel"):
        merge("multislerp", [a, -a, t(0.0, 1.0)], weight=[1.0, 1.0, 0.0])


# ---------------------------------------------------------------------------------------------
# karcher


def test_karcher_of_two_is_the_spherical_midpoint():
    assert close(merge("karcher", [t(1.0, 0.0), t(0.0, 1.0)]), t(HALF, HALF))
    # the scale is the mean norm, (3 + 1) / 2
    assert close(merge("karcher", [t(3.0, 0.0), t(0.0, 1.0)]), t(2 * HALF, 2 * HALF))


def test_karcher_averages_angles_not_vectors():
    # on a circle the Karcher mean of angles 0, 0 and pi/2 is the angle pi/6
    points = [t(1.0, 0.0), t(1.0, 0.0), t(0.0, 1.0)]
    assert close(merge("karcher", points), t(math.cos(math.pi / 6), 0.5))
    # without iterating it stays at the normalized Euclidean mean, [2, 1] / sqrt(5)
    assert close(merge("karcher", points, max_iter=0), t(2 / math.sqrt(5), 1 / math.sqrt(5)))


def test_karcher_zero_tensors_and_single_input():
    # the zero tensor has no direction but counts in the scale: (2 + 0 + 2) / 3
    out = merge("karcher", [t(2.0, 0.0), t(0.0, 0.0), t(0.0, 2.0)])
    assert close(out, t(4 / 3 * HALF, 4 / 3 * HALF))
    assert torch.equal(merge("karcher", [t(0.0, 0.0), t(0.0, 0.0)]), t(0.0, 0.0))
    x = t(1.0, -2.0)
    out = merge("karcher", [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ---------------------------------------------------------------------------------------------
# model_stock


def test_model_stock_ratio_from_the_angle():
    # offsets [3, 4] and [5, 0]: cos = 15 / 25 = 0.6, t = 2 * 0.6 / (1 + 0.6) = 0.75
    # 0.75 * average [5, 3] + 0.25 * base [1, 1]
    base = t(1.0, 1.0)
    out = merge("model_stock", [t(4.0, 5.0), t(6.0, 1.0), base], base_index=2)
    assert close(out, t(4.0, 2.5))
    # orthogonal offsets: cos 0, t 0, the base
    assert torch.equal(merge("model_stock", [t(2.0, 1.0), t(1.0, 2.0), base], base_index=2), base)
    # opposite offsets: 1 + cos = 0 is singular, the base is kept
    assert torch.equal(merge("model_stock", [t(2.0, 3.0), t(0.0, -1.0), base], base_index=2), base)


def test_model_stock_three_models():
    # offsets e1, e1, e2: mean pairwise cos (1 + 0 + 0) / 3, t = 3 (1/3) / (1 + 2/3) = 0.6
    base = torch.zeros(3)
    e1, e2 = t(1.0, 0.0, 0.0), t(0.0, 1.0, 0.0)
    out = merge("model_stock", [base, e1, e1, e2], base_index=0)
    assert close(out, t(0.4, 0.2, 0.0))


def test_model_stock_filter_wise():
    base = torch.zeros(2, 2)
    first, second = t(3.0, 4.0, 1.0, 0.0).reshape(2, 2), t(5.0, 0.0, 0.0, 1.0).reshape(2, 2)
    # row 0 as above (t = 0.75 of the average [4, 2]); row 1 orthogonal (t = 0)
    out = merge("model_stock", [first, second, base], base_index=2, filter_wise=True)
    assert close(out, t(3.0, 1.5, 0.0, 0.0).reshape(2, 2))
    # one cosine for the whole tensor: 15 / 26, t = (30/26) / (41/26) = 30/41
    out = merge("model_stock", [first, second, base], base_index=2)
    assert close(out, (30 / 41) * t(4.0, 2.0, 0.5, 0.5).reshape(2, 2))
    with pytest.raises(ValueError, match="two models"):
        merge("model_stock", [first, base], base_index=1)


# ---------------------------------------------------------------------------------------------
# nearswap


def test_nearswap_takes_close_values():
    base = t(0.0, 0.0, 0.0, 0.0)
    other = t(0.005, 0.02, -0.1, 0.0)
    # weight min(1, 0.01 / distance): [1, 0.5, 0.1, 1 (distance 0)]
    out = merge("nearswap", [base, other], base_index=0, t=0.01)
    assert close(out, t(0.005, 0.01, -0.01, 0.0))
    # base second, nonzero: 1 + the same moves
    out = merge("nearswap", [other + 1, base + 1], base_index=1, t=0.01)
    assert close(out, t(1.005, 1.01, 0.99, 1.0))
    assert torch.equal(merge("nearswap", [base, other], base_index=0, t=0.0), base)


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


# ---------------------------------------------------------------------------------------------
# breadcrumbs

CRUMBS = t(1.0, -8.0, 3.0, -2.0, 0.5, 6.0, -4.0, 0.25, 7.0, -5.0)
ZERO10 = torch.zeros(10)


def test_breadcrumbs_drops_outliers_and_small_changes():
    # density 0.5 keeps 5 of 10; gamma 0.2 drops the 2 largest (8, 7), then the 3 smallest (0.25, 0.5, 1)
    out = merge("breadcrumbs", [CRUMBS, ZERO10], base_index=1, weight=[1.0, None], density=0.5, gamma=0.2)
    assert torch.equal(out, t(0.0, 0.0, 3.0, -2.0, 0.0, 6.0, -4.0, 0.0, 0.0, -5.0))
    # gamma 0.01 of 10 drops no outlier: the 5 largest stay, as in TIES
    out = merge("breadcrumbs", [CRUMBS, ZERO10], base_index=1, weight=[1.0, None], density=0.5)
    assert torch.equal(out, t(0.0, -8.0, 0.0, 0.0, 0.0, 6.0, -4.0, 0.0, 7.0, -5.0))
    # density 0.9 keeps 9: only one of the two outliers can go, the largest
    out = merge("breadcrumbs", [CRUMBS, ZERO10], base_index=1, weight=[1.0, None], density=0.9, gamma=0.2)
    assert torch.equal(out, CRUMBS * (CRUMBS.abs() != 8))
    # rescale restores the L1 norm: kept 20 of 36.75
    out = merge(
        "breadcrumbs", [CRUMBS, ZERO10], base_index=1, weight=[1.0, None], density=0.5, gamma=0.2, rescale=True
    )
    assert close(out, t(0.0, 0.0, 3.0, -2.0, 0.0, 6.0, -4.0, 0.0, 0.0, -5.0) * (36.75 / 20))


def test_breadcrumbs_ties_votes_on_signs():
    second = t(1.0, 1.0, -1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0)  # density 1: kept whole
    values = dict(weight=[1.0, 1.0, None], density=[0.5, 1.0, None], gamma=[0.2, 0.0, None])
    # the first keeps [0, 0, 3, -2, 0, 6, -4, 0, 0, -5]; plain breadcrumbs adds the two
    out = merge("breadcrumbs", [CRUMBS, second, ZERO10], base_index=2, **values)
    assert torch.equal(out, t(1.0, 1.0, 2.0, -1.0, 1.0, 5.0, -3.0, 1.0, 1.0, -4.0))
    # with the vote the second disagrees wherever the first kept something and is left out there
    out = merge("breadcrumbs_ties", [CRUMBS, second, ZERO10], base_index=2, **values)
    assert torch.equal(out, t(1.0, 1.0, 3.0, -2.0, 1.0, 6.0, -4.0, 1.0, 1.0, -5.0))


# ---------------------------------------------------------------------------------------------
# della


def _rows_with_known_ranks(count: int, width: int, seed: int) -> torch.Tensor:
    """`count` rows, each a random permutation of the magnitudes 1..width with random signs."""
    generator = seeded(seed)
    ranks = torch.argsort(torch.rand(count, width, generator=generator), dim=1).float() + 1
    signs = torch.where(torch.rand(count, width, generator=generator) < 0.5, -1.0, 1.0)
    return ranks * signs


def test_della_keep_probability_rises_with_magnitude_rank():
    delta = _rows_with_known_ranks(200_000, 5, seed=1)
    zero = torch.zeros_like(delta)
    # density 0.5, epsilon 0.2: ranks 1..5 in a row are kept with probability 0.3, 0.4, 0.5, 0.6, 0.7
    out = merge(
        "della_linear", [delta, zero], base_index=1, weight=[1.0, None], density=0.5, epsilon=0.2, rescale=False,
        generator=seeded(2),
    )
    kept = out != 0
    for rank, probability in enumerate((0.3, 0.4, 0.5, 0.6, 0.7), start=1):
        # 200000 draws each: standard error about 0.0011
        assert abs(kept[delta.abs() == rank].float().mean().item() - probability) < 0.006, rank
    assert torch.equal(out[kept], delta[kept])  # without rescale the survivors are untouched


def test_della_keeps_density_fraction_and_l1_norm():
    generator = seeded(7)
    delta = torch.randn(1000, 1000, generator=generator)
    zero = torch.zeros_like(delta)
    out = merge("della_linear", [delta, zero], base_index=1, weight=[1.0, None], density=0.3, generator=seeded(5))
    # one million draws averaging 0.3: standard error 0.00046; allow ~6 of them
    assert abs((out != 0).float().mean().item() - 0.3) < 0.003
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-4)  # rescale is on by default
    # a row of one element has no rank spread and is kept with probability `density`
    column = delta.reshape(-1, 1)
    out = merge(
        "della_linear", [column, column * 0], base_index=1, weight=[1.0, None], density=0.3, rescale=False,
        generator=seeded(5),
    )
    assert abs((out != 0).float().mean().item() - 0.3) < 0.003


def test_della_reproducible_from_seed_only():
    generator = seeded(11)
    base = torch.randn(200, 300, generator=generator)
    tensors = [base + torch.randn(base.shape, generator=generator), base + 0.5, base]
    args = dict(base_index=2, weight=[0.7, 0.3, None], density=0.4, epsilon=[0.1, 0.3, None])
    for name in ("della", "della_linear"):
        state = torch.get_rng_state()
        first = merge(name, tensors, generator=seeded(123), **args)
        assert torch.equal(torch.get_rng_state(), state), name  # the global RNG is never drawn from
        assert torch.equal(first, merge(name, tensors, generator=seeded(123), **args)), name
        assert not torch.equal(first, merge(name, tensors, generator=seeded(124), **args)), name


def test_della_edges_and_errors():
    models = [t(2.0, 0.0, 1.0, 3.0), t(1.0, 3.0, 0.0, 1.0), t(1.0, 1.0, 1.0, 1.0)]
    weights = dict(base_index=2, weight=[0.5, 1.0, None], generator=seeded(0))
    # density 1 drops nothing: weighted deltas [0.5, -0.5, 0, 1] and [0, 2, -1, 0]
    assert torch.equal(merge("della_linear", models, **weights), t(1.5, 2.5, 0.0, 2.0))
    # della votes (+ at element 1 leaves out the -0.5) and normalizes by the agreeing weight
    assert torch.equal(merge("della", models, **weights), t(2.0, 3.0, 0.0, 3.0))
    assert torch.equal(merge("della", models, density=0.0, **weights), models[2])
    for density, epsilon in ((0.1, 0.15), (0.9, 0.15), (0.5, 0.5)):
        with pytest.raises(ValueError, match="epsilon"):
            merge("della", models, density=density, epsilon=epsilon, **weights)
    with pytest.raises(ValueError, match="Generator"):
        merge("della", models, base_index=2, weight=[0.5, 1.0, None], density=0.5)


# ---------------------------------------------------------------------------------------------
# Parity with mergekit, bit for bit, at kernel level


@pytest.fixture(scope="module")
def mergekit_methods():
    pytest.importorskip("mergekit")
    from mergekit import merge_methods

    return merge_methods


def mergekit_merge(mergekit_methods, name, tensors, *, base_index=None, **values):
    """Run mergekit's method on one tensor group, per-model values given as a list over all inputs."""
    group = mergekit_methods.TensorGroup.from_tensors(tensors, base_index=base_index)
    parameters = {
        key: {index: v for index, v in enumerate(value) if v is not None} if isinstance(value, list) else value
        for key, value in values.items()
    }
    (out,) = mergekit_methods.get(name)([group], parameters=parameters, dtype=tensors[0].dtype)
    return out


def random_models(shape, count, dtype, seed, spread=0.05):
    """A base and `count - 1` fine-tunes of it: the last tensor is the base."""
    generator = seeded(seed)
    base = torch.randn(shape, generator=generator)
    tunes = [base + spread * torch.randn(shape, generator=generator) for _ in range(count - 1)]
    return [x.to(dtype) for x in (*tunes, base)]


# (method, inputs including the base, values with per-model lists over all inputs, base last)
PARITY_CASES = [
    ("nuslerp", 3, {"weight": [0.3, 0.9, None]}),
    ("nuslerp", 3, {"weight": [0.3, 0.9, None], "nuslerp_flatten": False}),
    ("nuslerp", 3, {"weight": [0.3, 0.9, None], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 4, {"weight": [0.3, 0.9, 0.5, None]}),
    ("multislerp", 4, {"weight": [0.3, 0.9, 0.5, None], "normalize_weights": False}),
    ("karcher", 4, {}),
    ("karcher", 4, {"max_iter": 3, "tol": 1e-3}),
    ("model_stock", 4, {}),
    ("model_stock", 4, {"filter_wise": True}),
    ("nearswap", 2, {"t": 0.01}),
    ("arcee_fusion", 2, {}),
    ("sce", 4, {}),
    ("sce", 4, {"select_topk": 0.3}),
    ("sce", 4, {"select_topk": 0.3, "int8_mask": True}),
    ("ram", 4, {"epsilon": 0.03}),
    ("ramplus_tl", 4, {}),
    ("ramplus_tl", 4, {"epsilon": 0.03, "r": 0.5, "alpha": 1.0}),
    (
        "breadcrumbs",
        4,
        {"weight": [0.5, 0.3, 0.9, None], "density": [0.5, 0.8, 0.9, None], "gamma": [0.01, 0.1, 0.0, None]},
    ),
    ("breadcrumbs_ties", 4, {"weight": [0.5, 0.3, 0.9, None], "density": 0.7, "gamma": 0.05, "rescale": True}),
    ("breadcrumbs_ties", 4, {"weight": [0.5, -0.3, 0.9, None], "density": 0.4, "normalize": True, "lambda": 1.5}),
]
PARITY_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARITY_SHAPES = [(64, 48), (300,), (3, 5, 7)]


@pytest.mark.parametrize("dtype", PARITY_DTYPES)
@pytest.mark.parametrize("shape", PARITY_SHAPES)
@pytest.mark.parametrize("name, count, values", PARITY_CASES)
@pytest.mark.parametrize("base_first", [False, True])
def test_matches_mergekit(mergekit_methods, dtype, shape, name, count, values, base_first):
    tensors = random_models(shape, count, dtype, seed=3)
    base_index = count - 1
    if base_first:  # move the base (and its None) to the front
        tensors = [tensors[-1], *tensors[:-1]]
        values = {k: [v[-1], *v[:-1]] if isinstance(v, list) else v for k, v in values.items()}
        base_index = 0
    before = [x.clone() for x in tensors]
    ours = merge(name, tensors, base_index=base_index, **values)
    theirs = mergekit_merge(mergekit_methods, name, tensors, base_index=base_index, **values)
    assert all(torch.equal(x, y) for x, y in zip(tensors, before))  # inputs untouched
    assert ours.dtype == dtype and ours.shape == tensors[0].shape
    # mergekit hands some 16-bit results back in float32 (arcee_fusion, ramplus_tl) and casts them
    # to the output dtype when it writes; ours are rounded once to the compute dtype, the same bytes.
    assert torch.equal(ours, theirs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_mergekit_without_a_base_and_in_corner_cases(mergekit_methods, dtype):
    tensors = random_models((64, 48), 3, dtype, seed=5, spread=1.0)
    a, b, base = tensors
    cases = [
        ("nuslerp", [a, b], None, {"weight": [0.2, 0.7]}),
        ("nuslerp", [a, b], None, {"weight": [0.2, 0.7], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("nuslerp", [a, b, base], 2, {"weight": [1.0, -1.0, None]}),  # weights cancel: t = 1/2
        ("nuslerp", [a, 2 * a], None, {"weight": [0.2, 0.7]}),  # parallel
        ("multislerp", [a, b, base], None, {"weight": [0.2, 0.7, 0.4]}),
        ("multislerp", [a, -a], None, {"weight": [0.5, 0.5]}),  # opposite: linear
        ("multislerp", [a, base], 1, {"weight": [0.5, None]}),  # one model
        ("karcher", [a, torch.zeros_like(a), b], None, {}),
        ("karcher", [a, 3 * a], None, {}),
        ("karcher", [a, b, base], 2, {}),  # the base takes part: it is ignored only as a base
        ("model_stock", [base + (a - base), base - (a - base), base], 2, {}),  # singular
        ("sce", [a, base], 1, {"select_topk": 0.5}),
    ]
    for name, group, base_index, values in cases:
        ours = merge(name, group, base_index=base_index, **values)
        theirs = mergekit_merge(mergekit_methods, name, group, base_index=base_index, **values)
        assert torch.equal(ours, theirs.to(dtype)), (name, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_mergekit_on_large_tensors(mergekit_methods, dtype):
    # bf16 magnitudes repeat often, so the sort order among ties is exercised at scale
    tensors = random_models((1024, 1100), 3, dtype, seed=8)
    values = {"weight": [0.6, 0.4, None], "density": [0.3, 0.6, None], "gamma": 0.02}
    ours = merge("breadcrumbs_ties", tensors, base_index=2, **values)
    assert torch.equal(ours, mergekit_merge(mergekit_methods, "breadcrumbs_ties", tensors, base_index=2, **values))
    # Over a million elements arcee_fusion samples its quartiles: mergekit from the global RNG,
    # we from the generator; seeded alike, they draw the same sample.
    pair = random_models((1100, 1000), 2, dtype, seed=7)
    ours = merge("arcee_fusion", pair, base_index=1, generator=seeded(11))
    torch.manual_seed(11)
    theirs = mergekit_merge(mergekit_methods, "arcee_fusion", pair, base_index=1)
    assert torch.equal(ours, theirs.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(64, 48), (300,), (4, 6, 5)])
def test_della_matches_mergekit_seeded_alike(mergekit_methods, dtype, shape):
    # mergekit draws DELLA's masks from the global RNG; with it seeded as our generator the masks,
    # and so the bytes, agree where both rank and draw in float32 (float32 and float16 inputs).
    tensors = random_models(shape, 4, dtype, seed=9)
    values = {"weight": [0.5, 0.3, 0.9, None], "density": [0.4, 0.6, 0.5, None], "epsilon": [0.1, 0.2, 0.05, None]}
    for name in ("della", "della_linear"):
        ours = merge(name, tensors, base_index=3, generator=seeded(5), **values)
        torch.manual_seed(5)
        theirs = mergekit_merge(mergekit_methods, name, tensors, base_index=3, **values)
        assert torch.equal(ours, theirs), name


def test_new_declarations_match_mergekit(mergekit_methods):
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    policies = {BasePolicy.REQUIRED: "required", BasePolicy.IGNORED: "ignored", BasePolicy.OPTIONAL: "optional"}
    for name in sorted(NEW_METHODS):
        ours, spec = methods.get(name), mergekit_methods.get(name).spec
        assert {p.name for p in ours.parameters} == {p.name for p in spec.parameters}, name
        assert ours.base == policies[spec.contract.base], name
        assert (ours.min_models, ours.max_models) == (spec.contract.min_inputs or 1, spec.contract.max_inputs), name
        for theirs in spec.parameters:
            mine = ours.parameter(theirs.name)
            assert mine.per_model == (theirs.scope != ParameterScope.SHARED), (name, theirs.name)
            assert mine.applies_to_base == (theirs.scope != ParameterScope.NON_BASE), (name, theirs.name)
            expected_default = REQUIRED if theirs.default is MISSING else theirs.default
            assert mine.default == expected_default or mine.default is expected_default, (name, theirs.name)
    # mergekit's only non-base counts (nuslerp exactly 2, multislerp at least 1) are kernel checks here
    assert mergekit_methods.get("nuslerp").spec.contract.min_non_base == 2
    assert mergekit_methods.get("nuslerp").spec.contract.max_non_base == 2
    assert mergekit_methods.get("multislerp").spec.contract.min_non_base == 1
    with pytest.raises(ValueError, match="at least one model"):
        merge("multislerp", [t(1.0)], base_index=0, weight=[None])

"""Methods that interpolate between models: linear, passthrough, SLERP, NuSLERP, Multi-SLERP,
Karcher, Model Stock and NearSwap, on hand-computed values.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import close, merge, t

HALF = math.sqrt(2) / 2


# ---------------------------------------------------------------------------------------------
# linear


A = t(1.0, 2.0, -4.0, 0.5)
B = t(3.0, -2.0, 0.0, 8.5)


def test_linear_normalized():
    # (1*A + 3*B) = [10, -4, -4, 26], divided by 1 + 3
    out = merge("linear", [A, B], weight=[1.0, 3.0])
    assert torch.equal(out, t(2.5, -1.0, -1.0, 6.5))


def test_linear_unnormalized():
    out = merge("linear", [A, B], weight=[1.0, 3.0], normalize=False)
    assert torch.equal(out, t(10.0, -4.0, -4.0, 26.0))


def test_linear_keeps_16_bit_dtype_and_inputs():
    a, b = A.to(torch.bfloat16), B.to(torch.bfloat16)
    a_before, b_before = a.clone(), b.clone()
    out = merge("linear", [a, b], weight=[1.0, 3.0])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, t(2.5, -1.0, -1.0, 6.5, dtype=torch.bfloat16))
    assert torch.equal(a, a_before) and torch.equal(b, b_before)


def test_linear_of_scalars_and_matrices():
    # 0.25 * 8 + 0.75 * 4 = 5
    assert torch.equal(merge("linear", [torch.tensor(8.0), torch.tensor(4.0)], weight=[0.25, 0.75]), torch.tensor(5.0))
    out = merge("linear", [torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 4.0)], weight=[1.0, 2.0, 1.0])
    assert torch.equal(out, torch.full((2, 3), 1.25))  # (1 + 0 + 4) / 4


# ---------------------------------------------------------------------------------------------
# passthrough


def test_passthrough_copies_or_scales():
    x = t(1.0, -2.0, 3.0)
    out = merge("passthrough", [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(merge("passthrough", [x], scale=[2.0]), t(2.0, -4.0, 6.0))
    with pytest.raises(ValueError):
        merge("passthrough", [x, x])


# ---------------------------------------------------------------------------------------------
# slerp


def test_slerp_orthogonal_midpoint():
    # angle pi/2: both coefficients are sin(pi/4) / sin(pi/2) = sqrt(2)/2
    out = merge("slerp", [t(2.0, 0.0), t(0.0, 3.0)], base_index=0, t=0.5)
    half = math.sqrt(2) / 2
    assert torch.allclose(out, t(2 * half, 3 * half), rtol=1e-6, atol=0)


def test_slerp_goes_from_the_base():
    # base e1, other e2, t=1/3: (sin(pi/3), sin(pi/6)) = (0.8660254, 0.5); base listed second
    out = merge("slerp", [t(0.0, 1.0), t(1.0, 0.0)], base_index=1, t=1 / 3)
    assert torch.allclose(out, t(0.8660254, 0.5), rtol=1e-6, atol=1e-7)


def test_slerp_endpoints():
    a, b = t(1.0, 2.0, 3.0), t(-2.0, 0.5, 1.0)
    assert torch.equal(merge("slerp", [a, b], base_index=0, t=0.0), a)
    assert torch.allclose(merge("slerp", [a, b], base_index=0, t=1.0), b, rtol=1e-6, atol=1e-7)


def test_slerp_zero_base_is_not_nan():
    # a zero norm is left undivided: the dot is 0, angle pi/2, coefficients sqrt(2)/2
    out = merge("slerp", [t(0.0, 0.0), t(1.0, 1.0)], base_index=0, t=0.5)
    half = math.sqrt(2) / 2
    assert torch.allclose(out, t(half, half), rtol=1e-6, atol=0)


def test_slerp_parallel_and_antiparallel_fall_back_to_lerp():
    # parallel: 0.75 * [1, 2] + 0.25 * [2, 4]
    assert torch.equal(merge("slerp", [t(1.0, 2.0), t(2.0, 4.0)], base_index=0, t=0.25), t(1.25, 2.5))
    # antiparallel: 0.5 * [1, 2] + 0.5 * [-1, -2]
    assert torch.equal(merge("slerp", [t(1.0, 2.0), t(-1.0, -2.0)], base_index=0, t=0.5), t(0.0, 0.0))


def test_slerp_shape_dtype_and_errors():
    a = torch.eye(3, dtype=torch.bfloat16)
    out = merge("slerp", [a, a.flip(0)], base_index=0, t=0.5)
    assert out.shape == (3, 3) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        merge("slerp", [A, B, A], base_index=0, t=0.5)
    with pytest.raises(ValueError):
        merge("slerp", [A, B], base_index=None, t=0.5)


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

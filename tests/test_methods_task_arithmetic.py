"""The task-arithmetic family (`mbuild/methods/task_arithmetic.py`): task arithmetic, TIES, DARE,
breadcrumbs and DELLA, each a row of data, on hand-computed values and seeded statistics.
"""

from __future__ import annotations

import pytest
import torch

from kernels import close, merge, resolve, seeded, t
from mbuild import methods
from mbuild.methods.task_arithmetic import TaskArithmeticVariant

BASE = t(1.0, 1.0, 1.0, 1.0)
M1 = t(2.0, 0.0, 1.0, 3.0)  # delta [1, -1, 0, 2]
M2 = t(1.0, 3.0, 0.0, 1.0)  # delta [0, 2, -1, 0]


# ---------------------------------------------------------------------------------------------
# The rows


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


def test_count_consensus_variant():
    variant = TaskArithmeticVariant(
        name="ties_count", sparsification=None, consensus="count", normalize=True, rescale=False, paper="", summary=""
    )
    method = variant.method()
    tensors = [t(3.0), t(-1.0), t(-1.0), t(0.0)]
    params, model_params = resolve(method, 4, 3, {"weight": [1.0, 1.0, 1.0, None]})
    out = method.kernel(tensors, base_index=3, params=params, model_params=model_params, generator=None)
    assert torch.equal(out, t(-1.0))  # two negatives outvote one positive: (-1 - 1) / 2
    # the same inputs under "sum" elect + (3 - 1 - 1 = 1): only the 3 survives
    assert torch.equal(merge("ties", tensors, base_index=3, weight=[1.0, 1.0, 1.0, None]), t(3.0))


# ---------------------------------------------------------------------------------------------
# task arithmetic


def test_task_arithmetic_sum_of_weighted_deltas():
    # 0.5*[1, -1, 0, 2] + [0, 2, -1, 0] = [0.5, 1.5, -1, 1], plus the base
    out = merge("task_arithmetic", [M1, M2, BASE], base_index=2, weight=[0.5, 1.0, None])
    assert torch.equal(out, t(1.5, 2.5, 0.0, 2.0))
    # base listed first: same numbers
    out = merge("task_arithmetic", [BASE, M1, M2], base_index=0, weight=[None, 0.5, 1.0])
    assert torch.equal(out, t(1.5, 2.5, 0.0, 2.0))


def test_task_arithmetic_normalize_and_lambda():
    out = merge("task_arithmetic", [M1, M2, BASE], base_index=2, weight=[0.5, 1.0, None], normalize=True)
    assert torch.allclose(out, t(4 / 3, 2.0, 1 / 3, 5 / 3), rtol=1e-6, atol=0)  # mixed / 1.5
    out = merge("task_arithmetic", [M1, M2, BASE], base_index=2, weight=[0.5, 1.0, None], **{"lambda": 2.0})
    assert torch.equal(out, t(2.0, 4.0, -1.0, 3.0))  # 2 * mixed


def test_task_arithmetic_base_alone_and_inputs_untouched():
    out = merge("task_arithmetic", [BASE], base_index=0)
    assert torch.equal(out, BASE) and out.data_ptr() != BASE.data_ptr()
    before = [x.clone() for x in (M1, M2, BASE)]
    merge("ties", [M1, M2, BASE], base_index=2, weight=[1.0, 1.0, None], density=0.5)
    assert all(torch.equal(x, y) for x, y in zip((M1, M2, BASE), before))
    with pytest.raises(ValueError, match="base"):
        merge("task_arithmetic", [M1, M2], base_index=None, weight=[1.0, 1.0])


# ---------------------------------------------------------------------------------------------
# ties


ZERO = torch.zeros(4)
T1 = t(3.0, -1.0, 0.5, -2.0)
T2 = t(-4.0, 2.0, 0.25, -1.0)


def test_ties_trim_elect_merge():
    # density 0.5 keeps 2 of 4: T1 -> [3, 0, 0, -2], T2 -> [-4, 2, 0, 0]. Weighted [6,0,0,-4] + [-4,2,0,0]
    # sum [2, 2, 0, -4] elects signs [+, +, +, -]; agreeing: T1 at 0 and 3, T2 at 1.
    # mixed [6, 2, 0, -4] / agreeing weight [2, 1, 0->1, 2] = [3, 2, 0, -2]
    out = merge("ties", [T1, T2, ZERO], base_index=2, weight=[2.0, 1.0, None], density=[0.5, 0.5, None])
    assert torch.equal(out, t(3.0, 2.0, 0.0, -2.0))
    unnormalized = merge(
        "ties", [T1, T2, ZERO], base_index=2, weight=[2.0, 1.0, None], density=0.5, normalize=False
    )
    assert torch.equal(unnormalized, t(6.0, 2.0, 0.0, -4.0))


def test_ties_equal_weights_elect_differently():
    # sum [-1, 2, 0, -2] elects [-, +, +, -]: T1 agrees at 3 only, T2 at 0 and 1
    out = merge("ties", [T1, T2, ZERO], base_index=2, weight=[1.0, 1.0, None], density=0.5)
    assert torch.equal(out, t(-4.0, 2.0, 0.0, -2.0))
    with_int8 = merge("ties", [T1, T2, ZERO], base_index=2, weight=[1.0, 1.0, None], density=0.5, int8_mask=True)
    assert torch.equal(with_int8, out)


def test_ties_density_extremes():
    # density 1: sum [-1, 1, 0.75, -3] elects [-, +, +, -]; T1 agrees at 2, 3; T2 everywhere
    # mixed [-4, 2, 0.75, -3] / [1, 1, 2, 2]
    out = merge("ties", [T1, T2, ZERO], base_index=2, weight=[1.0, 1.0, None])
    assert torch.equal(out, t(-4.0, 2.0, 0.375, -1.5))
    # density 0.1 of 4 elements still keeps one: [3, 0, 0, 0] and [-4, 0, 0, 0]; -4 wins the vote
    out = merge("ties", [T1, T2, ZERO], base_index=2, weight=[1.0, 1.0, None], density=0.1)
    assert torch.equal(out, t(-4.0, 0.0, 0.0, 0.0))
    out = merge("ties", [T1, T2, BASE], base_index=2, weight=[1.0, 1.0, None], density=0.0)
    assert torch.equal(out, BASE)


def test_float16_zero_total_weight_and_large_norms_stay_finite():
    # weights 1 and -1 cancel: normalize must leave the sum undivided (1e-8 is 0 in float16)
    half = [x.to(torch.float16) for x in (M1, M2, BASE)]
    out = merge("task_arithmetic", half, base_index=2, weight=[1.0, -1.0, None], normalize=True)
    assert torch.equal(out, t(2.0, -2.0, 2.0, 3.0, dtype=torch.float16))  # base + [1, -3, 1, 2]
    # an L1 norm of 100000 overflows a float16 sum (max 65504); the rescale, x 10/9, must stay finite
    delta = t(30000.0, -30000.0, 30000.0, 10000.0, dtype=torch.float16)
    out = merge("ties", [delta, torch.zeros_like(delta)], base_index=1, weight=[1.0, None], density=0.75, rescale=True)
    third = 100000.0 / 3
    assert torch.allclose(out.float(), t(third, -third, third, 0.0), rtol=1e-3)


def test_ties_rescale_restores_l1_norm():
    # keeps [3, 0, 0, -2] (L1 5 of 6.5), scaled by 1.3
    out = merge("ties", [T1, ZERO], base_index=1, weight=[1.0, None], density=0.5, rescale=True)
    assert torch.allclose(out, t(3.9, 0.0, 0.0, -2.6), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# dare


def test_dare_without_drop_is_task_arithmetic():
    # density 1 drops nothing. Weighted deltas [0.5, -0.5, 0, 1] and [0, 2, -1, 0]: dare_linear adds
    # them; dare_ties elects + at element 1, so the -0.5 is left out there (1 + 2 = 3).
    expected = {"dare_linear": t(1.5, 2.5, 0.0, 2.0), "dare_ties": t(1.5, 3.0, 0.0, 2.0)}
    for name in ("dare_linear", "dare_ties"):
        out = merge(name, [M1, M2, BASE], base_index=2, weight=[0.5, 1.0, None], generator=seeded(0))
        assert torch.equal(out, expected[name]), name
        dropped = merge(name, [M1, M2, BASE], base_index=2, weight=[0.5, 1.0, None], density=0.0, generator=seeded(0))
        assert torch.equal(dropped, BASE), name


def test_dare_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        merge("dare_linear", [M1, BASE], base_index=1, weight=[1.0, None], density=0.5)


def _large_pair(shape=(1000, 1000)):
    generator = seeded(7)
    base = torch.randn(shape, generator=generator)
    return base, base + torch.randn(shape, generator=generator)


def test_dare_reproducible_from_seed():
    base, model = _large_pair((200, 300))
    other = base + 0.5
    args = dict(base_index=2, weight=[0.7, 0.3, None], density=0.4)
    for name in ("dare_linear", "dare_ties"):
        first = merge(name, [model, other, base], generator=seeded(123), **args)
        again = merge(name, [model, other, base], generator=seeded(123), **args)
        different = merge(name, [model, other, base], generator=seeded(124), **args)
        assert torch.equal(first, again), name
        assert not torch.equal(first, different), name


def test_dare_keeps_density_fraction_and_l1_norm():
    base, model = _large_pair()
    zero = torch.zeros_like(base)
    delta = model - base
    out = merge("dare_linear", [delta, zero], base_index=1, weight=[1.0, None], density=0.3, generator=seeded(5))
    kept = out != 0
    # one million Bernoulli(0.3) draws: standard error 0.00046; allow ~6 of them
    assert abs(kept.float().mean().item() - 0.3) < 0.003
    assert torch.allclose(out.abs().sum(), delta.abs().sum(), rtol=1e-5)
    assert torch.allclose(out[kept] / delta[kept], torch.tensor(1 / 0.3), rtol=0.02)

    plain = merge(
        "dare_linear", [delta, zero], base_index=1, weight=[1.0, None], density=0.3, rescale=False, generator=seeded(5)
    )
    assert torch.equal(plain != 0, kept)  # same seed, same mask
    assert torch.equal(plain[kept], delta[kept])  # without rescale the survivors are untouched


def test_dare_mask_does_not_depend_on_compute_dtype():
    base, model = _large_pair()
    zero = torch.zeros_like(base)
    delta = model - base
    full = merge("dare_linear", [delta, zero], base_index=1, weight=[1.0, None], density=0.5, generator=seeded(9))
    half = delta.to(torch.bfloat16)
    low = merge(
        "dare_linear", [half, zero.to(torch.bfloat16)], base_index=1, weight=[1.0, None], density=0.5, generator=seeded(9)
    )
    assert low.dtype == torch.bfloat16
    # the same elements survive, except where rounding to bf16 made the delta itself zero
    assert torch.equal((full != 0) & (half != 0), low != 0)


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

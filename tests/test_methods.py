"""Tests for mbuild.methods: the registry, the declarations, and every kernel's numbers.

Hand-computed values come first; the bit-for-bit comparisons with mergekit sit in their
own section at the end and skip cleanly when mergekit is not installed.
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mbuild import methods
from mbuild.methods import REQUIRED, Method, Parameter
from mbuild.methods.task_arithmetic import TaskArithmeticVariant

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {"dare_linear", "dare_ties", "linear", "passthrough", "slerp", "task_arithmetic", "ties"}


def resolve(method: Method, count: int, base_index: int | None, values: dict) -> tuple[dict, list[dict]]:
    """Resolve values the way the engine does: defaults filled, per-model lists split by input, base skipped where due."""
    params: dict = {}
    model_params: list[dict] = [{} for _ in range(count)]
    for parameter in method.parameters:
        given = values.get(parameter.name, parameter.default)
        if not parameter.per_model:
            params[parameter.name] = given
            continue
        for index in range(count):
            if index == base_index and not parameter.applies_to_base:
                continue
            value = given[index] if isinstance(given, (list, tuple)) else given
            assert value is not REQUIRED, f"test forgot {parameter.name}"
            model_params[index][parameter.name] = value
    return params, model_params


def merge(name: str, tensors, *, base_index=None, generator=None, dtype=None, **values) -> torch.Tensor:
    """Run a registered kernel on `tensors` with `values` (per-model ones as a list over all inputs).

    `dtype` (methods with stored_inputs only): the compute dtype the kernel converts to.
    """
    method = methods.get(name)
    params, model_params = resolve(method, len(tensors), base_index, values)
    extra = {"dtype": dtype} if dtype is not None else {}
    return method.kernel(
        tensors, base_index=base_index, params=params, model_params=model_params, generator=generator, **extra
    )


def t(*values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Registry and declarations


def test_import_does_not_import_torch():
    code = "import mbuild.methods, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_built_in_method_is_registered_sorted():
    names = [method.name for method in methods.all_methods()]
    assert names == sorted(names)
    assert BUILT_IN <= set(names)
    assert methods.get("ties").name == "ties"


def test_unknown_method_is_key_error():
    with pytest.raises(KeyError, match="no_such_method"):
        methods.get("no_such_method")


def test_duplicate_registration_is_rejected(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("linear"))
    fresh = Method(name="test_only", kernel=lambda *a, **k: None, parameters=(), paper="x")
    assert methods.register(fresh) is fresh
    assert methods.get("test_only") is fresh


def test_method_parameter_lookup():
    ties = methods.get("ties")
    assert ties.parameter("density").default == 1.0
    with pytest.raises(KeyError):
        ties.parameter("t")


def test_declarations():
    linear = methods.get("linear")
    assert linear.parameter("weight").default is REQUIRED and linear.parameter("weight").per_model
    assert linear.parameter("normalize").default is True and not linear.parameter("normalize").per_model
    assert linear.base == "ignored" and not linear.random

    slerp = methods.get("slerp")
    assert (slerp.base, slerp.min_models, slerp.max_models) == ("required", 2, 2)
    assert (slerp.parameter("t").minimum, slerp.parameter("t").maximum) == (0.0, 1.0)

    expected = {  # name: (normalize, rescale, random)
        "task_arithmetic": (False, False, False),
        "ties": (True, False, False),
        "dare_linear": (False, True, True),
        "dare_ties": (False, True, True),
    }
    for name, (normalize, rescale, random) in expected.items():
        method = methods.get(name)
        assert method.base == "required" and method.random is random, name
        assert method.parameter("normalize").default is normalize, name
        assert method.parameter("rescale").default is rescale, name
        assert method.parameter("lambda").default == 1.0
        assert method.parameter("int8_mask").default is False
        assert not method.parameter("weight").applies_to_base
        assert method.parameter("weight").default is REQUIRED
        assert (method.parameter("density").minimum, method.parameter("density").maximum) == (0.0, 1.0)

    passthrough = methods.get("passthrough")
    assert passthrough.max_models == 1 and passthrough.parameter("scale").default is None

    for method in methods.all_methods():
        assert method.summary and method.paper.startswith("https://"), method.name


def test_method_declaration_is_checked():
    with pytest.raises(ValueError, match="base"):
        Method(name="x", kernel=print, parameters=(), paper="p", base="sometimes")
    weight = Parameter("weight", float, per_model=True)
    with pytest.raises(ValueError, match="twice"):
        Method(name="x", kernel=print, parameters=(weight, weight), paper="p")


def test_required_survives_pickle_and_copy():
    assert pickle.loads(pickle.dumps(REQUIRED)) is REQUIRED
    assert copy.deepcopy(methods.get("linear")).parameter("weight").default is REQUIRED
    assert repr(REQUIRED) == "REQUIRED"


# ---------------------------------------------------------------------------------------------
# Parameter.validate


def test_validate_float_accepts_int_and_coerces():
    weight = methods.get("linear").parameter("weight")
    value = weight.validate(2)
    assert value == 2.0 and type(value) is float


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5], float("nan"), float("inf")])
def test_validate_float_rejects(bad):
    with pytest.raises(ValueError):
        methods.get("linear").parameter("weight").validate(bad)


def test_validate_range_is_inclusive_and_named_in_message():
    density = methods.get("ties").parameter("density")
    assert density.validate(0) == 0.0 and density.validate(1) == 1.0
    with pytest.raises(ValueError, match=r"from 0 to 1, got 1\.5"):
        density.validate(1.5)
    with pytest.raises(ValueError, match=r"got -0\.1"):
        density.validate(-0.1)
    one_sided = Parameter("k", int, per_model=False, default=1, minimum=1)
    with pytest.raises(ValueError, match="at least 1"):
        one_sided.validate(0)


def test_validate_bool_int_str_and_optional():
    normalize = methods.get("linear").parameter("normalize")
    assert normalize.validate(False) is False
    for bad in (1, 0, "true"):
        with pytest.raises(ValueError):
            normalize.validate(bad)
    count = Parameter("k", int, per_model=False, default=1)
    assert count.validate(3) == 3
    for bad in (True, 2.5):
        with pytest.raises(ValueError):
            count.validate(bad)
    label = Parameter("label", str, per_model=False, default="a")
    assert label.validate("b") == "b"
    with pytest.raises(ValueError):
        label.validate(3)
    scale = methods.get("passthrough").parameter("scale")
    assert scale.validate(None) is None and scale.validate(2) == 2.0
    with pytest.raises(ValueError):  # None only where None is the default
        methods.get("ties").parameter("density").validate(None)


def test_parameter_rejects_default_out_of_range():
    with pytest.raises(ValueError):
        Parameter("density", float, per_model=True, default=2.0, minimum=0.0, maximum=1.0)


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
# task arithmetic family

BASE = t(1.0, 1.0, 1.0, 1.0)
M1 = t(2.0, 0.0, 1.0, 3.0)  # delta [1, -1, 0, 2]
M2 = t(1.0, 3.0, 0.0, 1.0)  # delta [0, 2, -1, 0]


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
# passthrough


def test_passthrough_copies_or_scales():
    x = t(1.0, -2.0, 3.0)
    out = merge("passthrough", [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(merge("passthrough", [x], scale=[2.0]), t(2.0, -4.0, 6.0))
    with pytest.raises(ValueError):
        merge("passthrough", [x, x])


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


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 48), (300,)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(mergekit_methods, dtype, shape, normalize):
    tensors = random_models(shape, 3, dtype, seed=1, spread=1.0)
    # totals other than 1 (1.65, 1.8), so the division really rounds
    weights = [0.3, 0.9, 0.45] if normalize else [0.7, -0.2, 1.3]
    ours = merge("linear", tensors, weight=weights, normalize=normalize)
    theirs = mergekit_merge(mergekit_methods, "linear", tensors, weight=weights, normalize=normalize)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def _slerp_pairs(shape):
    """Float32 pairs: unrelated, nearly parallel (cosine above 0.9995), and opposite."""
    # Seed 4 at the large shape is one where reducing in 1M-element chunks changes the
    # float32 bytes versus one pass, so the chunking itself is under test.
    generator = seeded(4)
    a = torch.randn(shape, generator=generator)
    b = torch.randn(shape, generator=generator)
    near = 2 * a + 0.01 * torch.randn(shape, generator=generator)
    return {"random": (a, b), "near_parallel": (a, near), "antiparallel": (a, -a)}


SLERP_CASES = [
    *((dtype, shape) for dtype in (torch.float32, torch.bfloat16, torch.float64) for shape in SHAPES),
    # 1.5M elements: two chunks of mergekit's 1M-element norm and dot reductions
    (torch.float32, (1536, 1024)),
    (torch.bfloat16, (1536, 1024)),
]


@pytest.mark.parametrize("dtype, shape", SLERP_CASES)
def test_slerp_matches_mergekit(mergekit_methods, dtype, shape):
    pairs = _slerp_pairs(shape)
    for label, (a, b) in pairs.items():
        a, b = a.to(dtype), b.to(dtype)
        for base_index, factor in ((0, 0.3), (1, 0.75)):
            tensors = [a, b] if base_index == 0 else [b, a]
            ours = merge("slerp", tensors, base_index=base_index, t=factor)
            theirs = mergekit_merge(mergekit_methods, "slerp", tensors, base_index=base_index, t=factor)
            assert ours.dtype == theirs.dtype == dtype
            assert torch.equal(ours, theirs), (label, base_index)
        if label == "near_parallel":  # really took the linear branch
            expected = 0.7 * a.double() + 0.3 * b.double()
            assert torch.allclose(merge("slerp", [a, b], base_index=0, t=0.3).double(), expected, rtol=0.02, atol=0.02)


TASK_CASES = [
    # (method, values) with per-model lists for three fine-tunes then the base
    ("task_arithmetic", {"weight": [0.3, 0.7, 1.1, None]}),
    ("task_arithmetic", {"weight": [0.3, 0.7, 1.1, None], "normalize": True, "lambda": 0.6}),
    ("task_arithmetic", {"weight": [1.0, -1.0, 0.0, None], "normalize": True}),  # zero total weight
    ("ties", {"weight": [0.5, 0.3, 0.9, None], "density": [0.2, 0.5, 0.9, None]}),
    ("ties", {"weight": [1.0, 1.0, 1.0, None], "density": 0.35, "int8_mask": True}),
    ("ties", {"weight": [0.4, 0.6, 1.2, None], "density": [1.0, 0.0, 0.7, None], "lambda": 1.5}),
    ("ties", {"weight": [0.4, 0.6, 1.2, None], "density": 0.3, "normalize": False, "rescale": True}),
    ("ties", {"weight": [0.5, -0.5, 0.25, None], "density": 0.001}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name, values", TASK_CASES)
@pytest.mark.parametrize("base_first", [False, True])
def test_task_arithmetic_family_matches_mergekit(mergekit_methods, dtype, shape, name, values, base_first):
    tensors = random_models(shape, 4, dtype, seed=3)
    base_index = 3
    if base_first:  # move the base (and its None) to the front
        tensors = [tensors[3], *tensors[:3]]
        values = {k: [v[3], *v[:3]] if isinstance(v, list) else v for k, v in values.items()}
        base_index = 0
    ours = merge(name, tensors, base_index=base_index, **values)
    theirs = mergekit_merge(mergekit_methods, name, tensors, base_index=base_index, **values)
    assert ours.dtype == theirs.dtype == dtype
    if torch.isfinite(theirs).all():
        assert torch.equal(ours, theirs)
    else:  # mergekit divides by a float16 zero total weight; we deliberately do not
        assert dtype == torch.float16 and torch.isfinite(ours).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_family_slices_give_the_same_bytes(mergekit_methods, monkeypatch, dtype):
    # The element-wise half of the merge runs a slice at a time; slices that do not divide the
    # tensor (7 elements) must not change a byte.
    from mbuild.methods import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "COMBINE_SLICE", 7)
    tensors = random_models((64, 48), 4, dtype, seed=3)
    for name, values in TASK_CASES:
        ours = merge(name, tensors, base_index=3, **values)
        theirs = mergekit_merge(mergekit_methods, name, tensors, base_index=3, **values)
        if torch.isfinite(theirs).all():
            assert torch.equal(ours, theirs), name


ELEMENTWISE_CASES = [
    ("linear", {"weight": [0.3, 0.9, 0.45, 0.2], "normalize": True}),
    ("linear", {"weight": [0.7, -0.2, 1.3, 0.1], "normalize": False}),
    *[case for case in TASK_CASES if case[0] == "task_arithmetic"],
]


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name, values", ELEMENTWISE_CASES)
def test_elementwise_methods_run_in_slices_match_mergekit(
    mergekit_methods, monkeypatch, name, values, out_dtype, native
):
    # The engine runs element-wise methods a slice at a time, converting each slice of the
    # stored (bf16) inputs to float32 and writing the result into the output dtype; slices
    # that do not divide the tensor (7 elements) must give mergekit's bytes. Linear's C
    # one-pass form, where it applies, must too.
    from types import SimpleNamespace

    from mbuild import operations

    monkeypatch.setattr(operations, "ELEMENTWISE_SLICE", 7)
    method = methods.get(name)
    assert method.elementwise
    stored = random_models((64, 47), 4, torch.bfloat16, seed=7)
    base_index = 3 if method.base == "required" else None
    if base_index is None:
        values = {k: [x if x is not None else 0.5 for x in v] if isinstance(v, list) else v for k, v in values.items()}
    params, model_params = resolve(method, len(stored), base_index, values)
    options = {"base_index": base_index, "params": params, "model_params": model_params}
    task = SimpleNamespace(name="w", method=name, dtype=str(out_dtype).removeprefix("torch."))
    ours = operations._compute_in_slices(task, method, stored, torch.float32, options, target=None)
    computed = [x.float() for x in stored]
    theirs = mergekit_merge(mergekit_methods, name, computed, base_index=base_index, **values).to(out_dtype)
    assert ours.shape == theirs.shape and ours.dtype == out_dtype
    assert torch.equal(ours, theirs)


STORED_CASES = [
    *TASK_CASES,
    ("dare_linear", {"weight": [0.5, 0.3, 0.9, None], "density": 0.4}),
    ("dare_ties", {"weight": [0.5, 0.3, 0.9, None], "density": [0.2, 0.5, 0.9, None], "rescale": False}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.3, 0.9, None], "density": 0.6, "gamma": 0.05}),
    ("della", {"weight": [0.5, 0.3, 0.9, None], "density": 0.5, "epsilon": 0.1}),
    ("slerp", {"t": 0.3}),
]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name, values", STORED_CASES)
def test_stored_inputs_converted_piecewise_give_the_bytes_of_converted_inputs(monkeypatch, name, values, stored, compute):
    # Kernels declared with stored_inputs convert a slice at a time (7 elements here); the
    # bytes must be those of the same kernel on inputs converted whole beforehand.
    from mbuild.methods import slerp, task_arithmetic

    monkeypatch.setattr(task_arithmetic, "COMBINE_SLICE", 7)
    monkeypatch.setattr(slerp, "CHUNK_ELEMENTS", 7)
    method = methods.get(name)
    assert method.stored_inputs
    count = 2 if name == "slerp" else 4
    tensors = [x.to(stored) for x in random_models((31, 9), count, torch.float32, seed=9)]
    base_index = count - 1
    converted = [x.to(compute) for x in tensors]
    ours = merge(name, tensors, base_index=base_index, generator=seeded(5), dtype=compute, **values)
    theirs = merge(name, converted, base_index=base_index, generator=seeded(5), **values)
    assert ours.dtype == theirs.dtype == compute
    assert torch.equal(ours.view(-1).view(torch.uint8), theirs.view(-1).view(torch.uint8))


def test_only_per_element_methods_are_declared_elementwise():
    # A method declared element-wise must give, on a slice of its inputs, that slice of its output.
    tensors = random_models((40, 30), 3, torch.float32, seed=8)
    for method in methods.all_methods():
        if not method.elementwise:
            continue
        base_index = 2 if method.base != "ignored" else None
        values = {p.name: [0.4, 0.7, 0.2] if p.per_model else None for p in method.parameters if p.name == "weight"}
        params, model_params = resolve(method, 3, base_index, {k: v for k, v in values.items() if v})
        options = {"base_index": base_index, "params": params, "model_params": model_params, "generator": None}
        whole = method.kernel(tensors, **options).reshape(-1)
        part = method.kernel([x.reshape(-1)[100:400] for x in tensors], **options)
        assert torch.equal(part, whole[100:400]), method.name
    assert not methods.get("slerp").elementwise and not methods.get("ties").elementwise


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_sum_consensus_edge_cases_match_mergekit(mergekit_methods, native, base_dtype):
    # The C combine (used for float32 TIES on the CPU) and the torch one, on the elements where
    # the order and rounding of the rules show: a sum of exactly 0 (elects +), zero and -0.0
    # deltas (agree with neither sign), weights cancelling to a zero divisor (becomes 1).
    base = t(0.5, -0.25, 1.0, -0.0, 3.0, 2.0, -1.5, 0.75).to(base_dtype)
    first = t(1.5, -1.25, 1.0, -0.0, 4.0, 2.0, -1.5, 1.0)
    second = t(-0.5, 0.75, 1.0, 1.0, 2.0, 1.0, -2.5, 0.5)
    third = t(1.5, -0.25, 0.0, -1.0, 3.5, 3.0, -1.5, 0.25)
    tensors = [first.to(base_dtype), second.to(base_dtype), third.to(base_dtype), base]
    cases = [
        {"weight": [1.0, 1.0, 1.0, None]},
        {"weight": [1.0, -1.0, 0.5, None]},
        {"weight": [1.0, 1.0, -1.0, None], "normalize": False},
        {"weight": [0.3, 0.7, 1.1, None], "lambda": 0.6},
    ]
    for values in cases:
        values = {**values, "density": 1.0}
        computed = [x.float() for x in tensors]
        ours = merge("ties", tensors, base_index=3, dtype=torch.float32, **values)
        theirs = mergekit_merge(mergekit_methods, "ties", computed, base_index=3, **values)
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), values


@pytest.mark.parametrize("name, values", [case for case in TASK_CASES if case[0] == "ties"])
def test_ties_from_stored_bf16_matches_mergekit_with_and_without_the_c_loops(mergekit_methods, native, name, values):
    # Stored bf16 inputs computed in float32: the configuration the C loops (task vector,
    # selection, thinning, combine) take on; without them, numpy and torch do the same steps.
    stored = random_models((96, 203), 4, torch.bfloat16, seed=12)
    ours = merge(name, stored, base_index=3, dtype=torch.float32, **values)
    theirs = mergekit_merge(mergekit_methods, name, [x.float() for x in stored], base_index=3, **values)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("count", [3, 4, 5, 6, 9])
@pytest.mark.parametrize("width", [7, 5917, 2 * 65536 + 33])
def test_ties_of_up_to_nine_fine_tunes_matches_mergekit(mergekit_methods, count, width):
    # Fine-tunes of very different scales, nothing thinned: the order in which the models'
    # contributions are summed shows in the bytes. The C combine takes up to 4; from 5 torch's
    # sum over models groups them otherwise, and the torch steps must run.
    generator = seeded(count * 1000 + width)
    base = torch.randn(width, generator=generator)
    tensors = [base + 10.0 ** (i - 2) * torch.randn(width, generator=generator) for i in range(count)] + [base]
    values = {"weight": [1.0 + 0.1 * i for i in range(count)] + [None], "density": 1.0}
    ours = merge("ties", tensors, base_index=count, dtype=torch.float32, **values)
    theirs = mergekit_merge(mergekit_methods, "ties", tensors, base_index=count, **values)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_ties_matches_mergekit_on_a_large_tensor(mergekit_methods):
    # bf16 deltas repeat magnitudes often, so the argsort tie order is exercised at scale.
    tensors = random_models((1024, 1100), 3, torch.bfloat16, seed=4)
    values = {"weight": [0.6, 0.4, None], "density": [0.3, 0.6, None]}
    ours = merge("ties", tensors, base_index=2, **values)
    theirs = mergekit_merge(mergekit_methods, "ties", tensors, base_index=2, **values)
    assert torch.equal(ours, theirs)


def test_passthrough_matches_mergekit(mergekit_methods):
    (x,) = random_models((64, 48), 1, torch.bfloat16, seed=5)
    for scale in (None, 0.37):
        ours = merge("passthrough", [x], scale=[scale])
        theirs = mergekit_merge(mergekit_methods, "passthrough", [x], scale=[scale] if scale else None)
        assert torch.equal(ours, theirs)


def test_declarations_match_mergekit(mergekit_methods):
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    for ours in methods.all_methods():
        spec = mergekit_methods.get(ours.name).spec
        assert {p.name for p in ours.parameters} == {p.name for p in spec.parameters}, ours.name
        assert ours.base == {
            BasePolicy.REQUIRED: "required",
            BasePolicy.IGNORED: "ignored",
            BasePolicy.OPTIONAL: "optional",
        }[spec.contract.base]
        assert (ours.min_models, ours.max_models) == (spec.contract.min_inputs or 1, spec.contract.max_inputs)
        for theirs in spec.parameters:
            mine = ours.parameter(theirs.name)
            assert mine.per_model == (theirs.scope != ParameterScope.SHARED), (ours.name, theirs.name)
            assert mine.applies_to_base == (theirs.scope != ParameterScope.NON_BASE), (ours.name, theirs.name)
            expected_default = REQUIRED if theirs.default is MISSING else theirs.default
            assert mine.default == expected_default or mine.default is expected_default, (ours.name, theirs.name)


@pytest.mark.parametrize("threads", [1, 3])
def test_linear_one_pass_gives_the_kernels_bytes(threads):
    # The C loop against merge_linear itself (float32 math, then the output dtype), over
    # sizes around its 512-column blocks, 1 to 5 models of very different scales, stored
    # float32, bfloat16 or both, with and without normalizing; 3 threads split the largest.
    from mbuild.methods import NonFiniteResult
    from mbuild.methods import native as c_loops
    from mbuild.methods.linear import merge_linear, merge_linear_in_one_pass

    if c_loops.library() is None or not c_loops.library().mbuild_has_fma():
        pytest.skip("the C extension was not built, or this CPU has no FMA")
    generator = torch.Generator().manual_seed(5)
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    checked = 0
    for size in (1, 7, 511, 512, 513, 3 * 64 * 512 + 17):
        for count in (1, 2, 3, 5):
            scales = [10.0 ** e for e in (0, -3, 3, 1, -1)[:count]]
            weights = (torch.rand(count, generator=generator) * 2 - 0.5).tolist()
            for mix in ("bf16", "f32", "both"):
                dtypes = [torch.bfloat16 if mix == "bf16" or (mix == "both" and i % 2) else torch.float32
                          for i in range(count)]
                tensors = [(torch.randn(size, generator=generator) * s).to(d) for s, d in zip(scales, dtypes)]
                for out_dtype in (torch.bfloat16, torch.float32):
                    for normalize in (True, False):
                        options = {"params": {"normalize": normalize}, "model_params": [{"weight": w} for w in weights]}
                        output = torch.empty(size, dtype=out_dtype)
                        assert merge_linear_in_one_pass(
                            tensors, output, compute_dtype=torch.float32, threads=threads, base_index=None, **options
                        )
                        expected = merge_linear(
                            [t.float() for t in tensors], base_index=None, generator=None, **options
                        ).to(out_dtype)
                        assert torch.equal(output.view(bits[out_dtype]), expected.view(bits[out_dtype]))
                        checked += 1
    assert checked == 6 * 4 * 3 * 2 * 2
    # Not finite: an error, never a silent inf.
    options = {"params": {"normalize": False}, "model_params": [{"weight": 1e38}, {"weight": 1e38}]}
    with pytest.raises(NonFiniteResult):
        merge_linear_in_one_pass([torch.full((9,), 4.0)] * 2, torch.empty(9), compute_dtype=torch.float32,
                                 threads=threads, **options)
    # Where it does not apply, it says so and the engine runs the kernel in slices.
    half = [torch.ones(9, dtype=torch.float16)] * 2
    options["model_params"] = [{"weight": 1.0}] * 2
    assert not merge_linear_in_one_pass(half, torch.empty(9), compute_dtype=torch.float32, threads=1, **options)
    assert not merge_linear_in_one_pass([torch.ones(9)] * 2, torch.empty(9, dtype=torch.float16),
                                        compute_dtype=torch.float32, threads=1, **options)
    assert not merge_linear_in_one_pass([torch.ones(9)] * 2, torch.empty(9), compute_dtype=torch.float64,
                                        threads=1, **options)


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_slerp_casting_its_output_gives_the_bytes_of_a_cast_after(monkeypatch, native, compute, stored):
    # SLERP declares casts_output: asked for out_dtype, it writes its result straight into
    # it (from float32 math through the C loops where built) instead of the engine casting a
    # whole compute-dtype result; the bytes must be those of the torch steps cast after.
    # Sizes around the C loops' 512-column blocks and thread split (3 parts from 3 * 64
    # blocks), and around SLERP's own chunks (made 1000 elements here).
    from mbuild.methods import NonFiniteResult, slerp
    from mbuild.methods import native as c_loops
    from mbuild.methods.slerp import merge_slerp

    built = c_loops.library  # the real loader, or (without C) the fixture's None
    monkeypatch.setattr(slerp, "CHUNK_ELEMENTS", 1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    options = {"base_index": 1, "model_params": [{}, {}], "generator": None, "dtype": compute}
    generator = seeded(21)
    try:
        for width in (1, 511, 513, 3 * 64 * 512 + 5):
            first = torch.randn(width, generator=generator)
            unrelated = [first * 0.02, torch.randn(width, generator=generator) * 3.0]
            # Nearly parallel (cos about 0.9992): the last bits of the dot show in the weights.
            close = [first, first + 0.04 * torch.randn(width, generator=generator)]
            for (t, out), pair in itertools.product(
                ((0.3, torch.bfloat16), (0.9, torch.float32), (0.5, torch.float16)), (unrelated, close)
            ):
                pair = [x.to(stored) for x in pair]
                monkeypatch.setattr(c_loops, "library", lambda: None)
                after = merge_slerp(pair, params={"t": t}, **options).to(out)
                monkeypatch.setattr(c_loops, "library", built if native else lambda: None)
                cast = merge_slerp(pair, params={"t": t}, out_dtype=out, **options)
                assert cast.dtype == out and torch.equal(cast.view(torch.uint8), after.view(torch.uint8))
        # An inf in an input makes every weight NaN: an error, never NaN written out.
        broken = [torch.ones(600).to(stored), torch.ones(600).to(stored)]
        broken[0][5] = float("inf")
        with pytest.raises(NonFiniteResult):
            merge_slerp(broken, params={"t": 0.5}, out_dtype=torch.bfloat16, **options)
    finally:
        torch.set_num_threads(threads)

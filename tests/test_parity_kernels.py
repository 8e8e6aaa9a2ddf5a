"""Every method's kernel against mergekit's, bit for bit, on tensors (skipped without mergekit).

The same inputs go to our kernel and to mergekit's method as one tensor group; besides random
inputs of every dtype and a few shapes, the cases include corner cases (weights that cancel,
parallel and opposite tensors), large tensors where sort ties matter, the engine's slices and
stored inputs, and the C loops (the `native` fixture runs those tests with and without them).
"""

from __future__ import annotations

import pytest
import torch

from kernels import TASK_CASES, merge, random_models, resolve, seeded, t
from mbuild import methods
from parity import mergekit_merge

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 48), (300,)]


# ---------------------------------------------------------------------------------------------
# linear, slerp, passthrough


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


def test_passthrough_matches_mergekit(mergekit_methods):
    (x,) = random_models((64, 48), 1, torch.bfloat16, seed=5)
    for scale in (None, 0.37):
        ours = merge("passthrough", [x], scale=[scale])
        theirs = mergekit_merge(mergekit_methods, "passthrough", [x], scale=[scale] if scale else None)
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------------------------
# The task-arithmetic family


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


@pytest.mark.parametrize("stored, compute", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32)])
def test_ties_ranked_then_recomputed_in_slices_matches_mergekit(mergekit_methods, monkeypatch, native, stored, compute):
    # TIES ranks each task vector whole, then recomputes the task vectors from the inputs a
    # slice at a time to thin and combine them; slices that do not divide the tensor (1009
    # elements), with the kept ties of the ranking (common in 16 bits) falling in many of
    # them, must give mergekit's bytes.
    from mbuild.methods import task_arithmetic

    monkeypatch.setattr(task_arithmetic, "SELECTED_SLICE", 1009)
    tensors = random_models((257, 301), 4, stored, seed=29)
    for name, values in TASK_CASES:
        if name != "ties":
            continue
        ours = merge(name, tensors, base_index=3, dtype=compute, **values)
        theirs = mergekit_merge(mergekit_methods, name, [x.to(compute) for x in tensors], base_index=3, **values)
        if torch.isfinite(theirs).all():
            assert ours.dtype == theirs.dtype == compute
            assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8)), values


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


# ---------------------------------------------------------------------------------------------
# The other methods: spherical, Model Stock, NearSwap, SCE, RAM, Arcee Fusion, breadcrumbs


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


# ---------------------------------------------------------------------------------------------
# 16-bit compute (`dtype: bfloat16` or `float16`): TIES' C loops round after every op as torch
# does, linear's and SLERP's run their float32 math from bfloat16 inputs. Tensors past torch's
# parallel grain (32768 elements), ours under several thread counts, mergekit's on one.

HALF_DTYPES = [torch.bfloat16, torch.float16]
TIES_16_CASES = [case for case in TASK_CASES if case[0] == "ties"] + [
    ("dare_ties", {"weight": [0.5, 0.3, 0.9, None], "density": [0.6, 0.5, 0.9, None]}),
    ("della", {"weight": [0.4, 0.6, 1.2, None], "density": 0.5, "epsilon": 0.1}),
]


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def torch_threads(request):
    """torch's thread count for our side of the test (mergekit's reference runs on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def mergekit_single_threaded(mergekit_methods, name, tensors, **values):
    """mergekit's result run on one torch thread, the reference every machine reproduces."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return mergekit_merge(mergekit_methods, name, tensors, **values)
    finally:
        torch.set_num_threads(before)


def same_bytes(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Same dtype and bits where finite, and non-finite in the same places (NaN's bits are
    never written: the engine refuses a non-finite result)."""
    finite = torch.isfinite(theirs)
    return (
        ours.dtype == theirs.dtype
        and torch.equal(torch.isfinite(ours), finite)
        and torch.equal(ours[finite].view(torch.int16), theirs[finite].view(torch.int16))
    )


def _without_c_loops(run):
    """run(), with the C loops taken away: the numpy and torch steps they replace."""
    from mbuild.methods import native

    saved = native.library
    native.library = lambda: None
    try:
        return run()
    finally:
        native.library = saved


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name, values", TIES_16_CASES)
def test_ties_computed_in_16_bits_matches_mergekit(mergekit_methods, native, torch_threads, dtype, name, values):
    if values.get("rescale") and torch_threads > 1:
        # Rescaling sums |delta| with torch, whose 16-bit sum splits between its threads; the
        # engine runs torch on one thread inside every task (engine.py), so only that counts.
        pytest.skip("torch's own 16-bit sum follows its thread count")
    tensors = random_models((257, 301), 4, dtype, seed=21)
    for base_first in (False, True):
        group, given, base_index = tensors, values, 3
        if base_first:
            group = [tensors[3], *tensors[:3]]
            given = {k: [v[3], *v[:3]] if isinstance(v, list) else v for k, v in values.items()}
            base_index = 0
        generator = seeded(5) if methods.get(name).random else None
        ours = merge(name, group, base_index=base_index, generator=generator, **given)
        if generator is not None:  # mergekit draws from the global RNG: compare with our torch steps
            steps = _without_c_loops(lambda: merge(name, group, base_index=base_index, generator=seeded(5), **given))
            assert torch.equal(ours.view(torch.int16), steps.view(torch.int16))
            continue
        theirs = mergekit_single_threaded(mergekit_methods, name, group, base_index=base_index, **given)
        assert same_bytes(ours, theirs)


def _edge_models(dtype) -> list[torch.Tensor]:
    """Three fine-tunes and a base (last) of 3 * 16384 + 11 elements whose first elements hit
    the rules' corners in 16 bits; the rest random."""
    tiny = torch.finfo(dtype).smallest_normal
    step = torch.finfo(dtype).eps  # one ulp at 1
    big = torch.finfo(dtype).max
    columns = [
        # (delta 1, delta 2, delta 3, base)
        (1.0, -1.0, 0.0, 0.5),  # weighted sum exactly 0 with equal weights: elects +
        (-0.0, -0.0, -0.0, -0.0),  # zeros agree with neither sign; -0 base plus +0
        (0.0, 0.0, 0.0, -0.0),
        (step / 2, step / 2, step / 2, 1.0),  # base + mixed at half an ulp: to even (1.0)
        (step / 2, step / 2, step / 2, 1.0 + step),  # ... and from odd (up)
        (-step / 2, step / 4, -step / 2, 1.0),
        (tiny / 4, -tiny / 8, tiny / 2, tiny),  # subnormal deltas (and products)
        (tiny / 1024, -tiny / 1024, tiny / 512, 0.0),  # the smallest subnormals
        (-tiny / 1024, -tiny / 2048, tiny / 4096, 0.0),  # products round to +-0 or the least
        (big / 2, big / 2, big / 2, big / 2),  # overflows: inf where torch's ops overflow
        (-big, big, big, 0.0),
        (3.0, 5.0, -7.0, 1.0 / 3.0),  # quotients between 16-bit values
        (1.0 / 3.0, 2.0 / 3.0, -1.0 / 7.0, 10.0),
    ]
    generator = seeded(33)
    size = 3 * 16384 + 11
    models = []
    for index in range(4):
        values = torch.randn(size, generator=generator) * (0.05 if index < 3 else 1.0)
        values[: len(columns)] = torch.tensor([column[index] for column in columns], dtype=torch.float64).float()
        models.append(values.to(dtype))
    edge = slice(0, len(columns))
    for index in range(3):  # deltas as given: fine-tune = base + delta, in the 16-bit dtype
        models[index][edge] = (models[3][edge].double() + models[index][edge].double()).to(dtype)
    return models


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_ties_computed_in_16_bits_matches_mergekit_on_edge_values(mergekit_methods, native, torch_threads, dtype):
    models = _edge_models(dtype)
    cases = [
        {"weight": [1.0, 1.0, 1.0, None], "density": 1.0},
        {"weight": [0.3, 0.7, 1.1, None], "density": 1.0, "lambda": 0.6},
        {"weight": [1.0, -1.0, 0.5, None], "density": 1.0},  # cancelling weights: zero divisors
        {"weight": [1.0, 1.0, -1.0, None], "density": 1.0, "normalize": False},
        # zero deltas times negative weights are -0.0: the sums start from +0.0, which a -0.0 base shows
        {"weight": [-1.0, -0.5, -2.0, None], "density": 1.0},
        {"weight": [0.1, 0.2, 0.3, None], "density": [0.5, 0.3, 0.9, None], "lambda": 1.7},
    ]
    for values in cases:
        ours = merge("ties", models, base_index=3, **values)
        theirs = mergekit_single_threaded(mergekit_methods, "ties", models, base_index=3, **values)
        assert same_bytes(ours, theirs), values


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_ties_16_bit_c_combine_agrees_in_its_portable_and_avx2_forms(dtype):
    # The combine runs a portable loop, or the same loop compiled for AVX2 and F16C where the
    # CPU has them; both must give torch's bytes (`_combine`, the steps it replaces).
    import ctypes

    from mbuild.methods import native, task_arithmetic

    library = native.library()
    if library is None:
        pytest.skip("the C extension was not built (no compiler at install)")
    models = _edge_models(dtype)
    deltas = torch.stack([m - models[3] for m in models[:3]])
    weights = [0.3, -0.7, 1.1]
    params = {"normalize": True, "lambda": 1.3, "int8_mask": False}
    variant = next(v for v in task_arithmetic.VARIANTS if v.name == "ties")
    expected = models[3] + variant._combine(deltas, torch.tensor(weights, dtype=dtype).reshape(3, 1), params)
    scales = torch.tensor(weights, dtype=dtype).float()
    kind = native.half_kind(deltas, models[3])
    for portable in (1, 0):
        out = torch.empty_like(models[3])
        status = library.mbuild_ties_combine16(
            deltas.data_ptr(), 3, deltas.shape[1], scales.data_ptr(), models[3].data_ptr(), kind, 1, 1,
            ctypes.c_float(1.3), out.data_ptr(), portable,
        )
        assert status == 0
        assert same_bytes(out, expected), portable


@pytest.mark.parametrize("threads", [1, 3])
def test_linear_and_slerp_computed_in_bf16_match_mergekit(mergekit_methods, native, threads):
    # mergekit's linear and SLERP do their math in float32 whatever `dtype` says: from bfloat16
    # inputs into a bfloat16 result the C loops that serve float32 compute give the same bytes.
    from types import SimpleNamespace

    from mbuild import operations
    from mbuild.methods import slerp

    stored = random_models((301, 257), 3, torch.bfloat16, seed=9, spread=1.0)
    for values in ({"weight": [0.3, 0.9, 0.45], "normalize": True}, {"weight": [0.7, -0.2, 1.3], "normalize": False}):
        method = methods.get("linear")
        params, model_params = resolve(method, 3, None, values)
        options = {"base_index": None, "params": params, "model_params": model_params}
        task = SimpleNamespace(name="w", method="linear", dtype="bfloat16")
        ours = operations._compute_in_slices(task, method, stored, torch.bfloat16, options, None, threads)
        theirs = mergekit_single_threaded(mergekit_methods, "linear", stored, **values)
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), values
    a, b = stored[0], stored[1]
    for t_value in (0.3, 0.5):
        params, model_params = resolve(methods.get("slerp"), 2, 1, {"t": t_value})
        ours = slerp.merge_slerp(
            [a, b], base_index=1, params=params, model_params=model_params, generator=None,
            dtype=torch.bfloat16, out_dtype=torch.bfloat16, threads=threads,
        )
        theirs = mergekit_single_threaded(mergekit_methods, "slerp", [a, b], base_index=1, t=t_value)
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), t_value


def test_bf16_results_that_round_to_inf_are_refused(native):
    # float32 math that is finite but rounds to bfloat16's inf: computed in bfloat16 the result
    # is inf, which the engine must refuse (as torch's steps do), not write.
    from types import SimpleNamespace

    from mbuild import operations
    from mbuild.errors import BuildError
    from mbuild.methods import NonFiniteResult, slerp

    big = torch.finfo(torch.bfloat16).max
    size = 40000
    first = torch.full((size,), big, dtype=torch.bfloat16)
    second = torch.full((size,), 2.0**119, dtype=torch.bfloat16)  # half an ulp of the largest
    method = methods.get("linear")
    params, model_params = resolve(method, 2, None, {"weight": [1.0, 1.0], "normalize": False})
    options = {"base_index": None, "params": params, "model_params": model_params}
    task = SimpleNamespace(name="w", method="linear", dtype="bfloat16")
    target = SimpleNamespace(location=lambda: "Mergefile")
    with pytest.raises(BuildError, match="non-finite"):
        operations._compute_in_slices(task, method, [first, second], torch.bfloat16, options, target, 1)
    # In float32 math the sum is finite: it is written, rounded (to inf), as torch writes it.
    written = operations._compute_in_slices(task, method, [first, second], torch.float32, options, target, 1)
    assert torch.isinf(written).all()
    # SLERP's last pass, the same store: weight 1 on each, bfloat16 math refuses, float32 writes inf.
    if native:
        for dtype, refused in ((torch.bfloat16, True), (torch.float32, False)):
            result = torch.empty(size, dtype=torch.bfloat16)
            if refused:
                with pytest.raises(NonFiniteResult):
                    slerp._combine_natively(first, second, 1.0, 1.0, result, 1, dtype)
            else:
                assert slerp._combine_natively(first, second, 1.0, 1.0, result, 1, dtype)
                assert torch.isinf(result).all()

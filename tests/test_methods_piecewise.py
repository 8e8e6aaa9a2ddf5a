"""A kernel run piecewise gives the bytes of one run over whole inputs: a slice at a time, converting
stored inputs as it goes, in the C loops' blocks and threads, and casting its own output.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from kernels import TASK_CASES, merge, random_models, resolve, seeded
from mbuild import methods

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

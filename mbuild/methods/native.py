"""The optional C loops (`_kernels.c`), loaded once through ctypes, or None where not built.

`pip install` compiles them when a C compiler is there (see setup.py); without one the
install goes on and every caller runs the same steps in numpy and torch, with the same bytes.
"""

from __future__ import annotations

import functools

# name: (return type, argument types), as ctypes names them; see _kernels.c for each.
_SIGNATURES = {
    # keys, index (int32), size, count, depth limit, threshold out
    "mbuild_follow_i32": ("c_int", ["c_void_p", "c_void_p", "c_int64", "c_int64", "c_int64", "c_float_p"]),
    # keys, index (int64), size, count, depth limit, threshold out
    "mbuild_follow_i64": ("c_int", ["c_void_p", "c_void_p", "c_int64", "c_int64", "c_int64", "c_float_p"]),
    # model, model is bf16, base, base is bf16, size, delta out
    "mbuild_task_vector": (None, ["c_void_p", "c_int", "c_void_p", "c_int", "c_int64", "c_void_p"]),
    # delta (thinned in place), size, threshold
    "mbuild_keep_above": (None, ["c_void_p", "c_int64", "c_float"]),
    # deltas, rows, size, weights, base, base is bf16, normalize, scale, lambda, out
    "mbuild_ties_combine": (
        "c_int",
        ["c_void_p", "c_int64", "c_int64", "c_void_p", "c_void_p", "c_int", "c_int", "c_int", "c_float", "c_void_p"],
    ),
    # 16-bit delta, kind (1 bfloat16, 2 float16), size, magnitudes out (float32)
    "mbuild_magnitudes16": (None, ["c_void_p", "c_int", "c_int64", "c_void_p"]),
    # 16-bit delta (thinned in place), kind, size, threshold
    "mbuild_keep_above16": (None, ["c_void_p", "c_int", "c_int64", "c_float"]),
    # 16-bit deltas, rows, size, weights (float32), 16-bit base, kind, normalize, scale, lambda, out,
    # portable (1: not the AVX2 and F16C loops, for tests)
    "mbuild_ties_combine16": (
        "c_int",
        ["c_void_p", "c_int64", "c_int64", "c_void_p", "c_void_p", "c_int", "c_int", "c_int", "c_float", "c_void_p",
         "c_int"],
    ),
    "mbuild_has_fma": ("c_int", []),
    # inputs (pointer array), inputs are bf16 (int array), rows, size, weights, normalize, divisor,
    # out, out is bf16, threads
    "mbuild_linear": (
        "c_int",
        ["c_void_p", "c_void_p", "c_int64", "c_int64", "c_void_p", "c_int", "c_float", "c_void_p", "c_int", "c_int"],
    ),
    # a, a is bf16, b, b is bf16, size, weight a, weight b, out, out is bf16, threads
    "mbuild_slerp_combine": (
        "c_int",
        ["c_void_p", "c_int", "c_void_p", "c_int", "c_int64", "c_float", "c_float", "c_void_p", "c_int", "c_int"],
    ),
    # a, a is bf16, b, b is bf16, size, norm a, norm b, out
    "mbuild_scaled_product": (
        None, ["c_void_p", "c_int", "c_void_p", "c_int", "c_int64", "c_float", "c_float", "c_void_p"]
    ),
}


def library_for(*tensors, contiguous: bool = False):
    """The C loops, where every tensor is float32 or bfloat16 on the CPU (and contiguous, if
    asked) and the extension was built; else None."""
    import torch

    usable = all(
        t.dtype in (torch.float32, torch.bfloat16) and t.device.type == "cpu" and (t.is_contiguous() or not contiguous)
        for t in tensors
    )
    return library() if usable else None


def half_kind(*tensors) -> int:
    """The 16-bit loops' code for the dtype all `tensors` share, contiguous on the CPU: 1
    bfloat16, 2 float16; 0 where they differ, are of another dtype, or elsewhere."""
    import torch

    kinds = {torch.bfloat16: 1, torch.float16: 2}
    first = tensors[0].dtype
    usable = all(t.dtype == first and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    return kinds.get(first, 0) if usable else 0


@functools.cache
def library():
    """The loaded C loops (a ctypes library), or None where the extension was not built."""
    import ctypes

    try:
        from mbuild.methods import _kernels
    except ImportError:
        return None
    loaded = ctypes.CDLL(_kernels.__file__)
    types = {"c_float_p": ctypes.POINTER(ctypes.c_float)}
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(loaded, name)
        function.restype = None if result is None else getattr(ctypes, result)
        function.argtypes = [types.get(kind) or getattr(ctypes, kind) for kind in arguments]
    return loaded

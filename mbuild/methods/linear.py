"""Linear merge ("model soups"): a weighted average of the inputs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch


def merge_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sum the inputs scaled by their weights, divided by the total weight when `normalize` is on."""
    import torch

    first = tensors[0]
    # Accumulate in float32 even for 16-bit inputs (float64 stays float64), as mergekit does.
    work_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p["weight"] for p in model_params], dtype=work_dtype, device=first.device)
    # One-element tensors rather than Python scalars: addcmul_ and div_ then round exactly as
    # mergekit's broadcast coefficients do.
    single = (1,) * first.ndim
    total = torch.zeros_like(first, dtype=work_dtype)
    for tensor, weight in zip(tensors, weights.unbind(0)):
        total.addcmul_(tensor, weight.reshape(single))
    if params["normalize"]:
        total.div_(weights.sum().reshape(single))
    return total.to(first.dtype)


def merge_linear_in_one_pass(
    tensors: Sequence[torch.Tensor],
    output: torch.Tensor,
    *,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    compute_dtype: torch.dtype,
    threads: int,
    **_: Any,
) -> bool:
    """`merge_linear` over whole tensors in one pass of the C loop, from stored inputs into `output`.

    The same bytes as the kernel run in float32 and cast to `output`'s dtype. False where the
    loop does not apply (not built; no FMA, whose single rounding torch's addcmul_ has on
    AVX2 and AVX-512 builds; dtypes other than float32 and bfloat16; a compute dtype other
    than float32, or than bfloat16 from bfloat16 inputs into a bfloat16 output).
    """
    import torch

    from mbuild.methods import NonFiniteResult, native

    library = native.library_for(output, *tensors, contiguous=True)
    # The kernel sums in float32 whatever the compute dtype, so bfloat16 math from bfloat16
    # inputs (converted exactly) into a bfloat16 output rounds once, as float32 math does;
    # only the finiteness check moves to the rounded values (out_bf16 = 2).
    all_bf16 = all(t.dtype == torch.bfloat16 for t in (output, *tensors))
    if (
        library is None
        or not (compute_dtype == torch.float32 or (compute_dtype == torch.bfloat16 and all_bf16))
        or _cpu_capability() not in ("AVX2", "AVX512")
        or not library.mbuild_has_fma()
    ):
        return False
    import ctypes

    weights = torch.tensor([p["weight"] for p in model_params], dtype=torch.float32)
    divisor = float(weights.sum())  # torch's float32 sum, as the kernel divides by
    pointers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    bf16 = (ctypes.c_int * len(tensors))(*(t.dtype == torch.bfloat16 for t in tensors))
    status = library.mbuild_linear(
        pointers, bf16, len(tensors), output.numel(), weights.data_ptr(), bool(params["normalize"]),
        divisor, output.data_ptr(), 2 if compute_dtype == torch.bfloat16 else int(output.dtype == torch.bfloat16),
        threads,
    )
    if status == 1:
        raise NonFiniteResult("non-finite result")
    return status == 0


def _cpu_capability() -> str:
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch: do not assume its kernels
        return "unknown"


register(
    Method(
        name="linear",
        kernel=merge_linear,
        parameters=(
            Parameter("weight", float, per_model=True, doc="scale of this model's tensors"),
            Parameter("normalize", bool, per_model=False, default=True, doc="divide by the sum of the weights"),
        ),
        paper="https://arxiv.org/abs/2203.05482",
        summary="weighted average of the models (model soups)",
        elementwise=True,
        one_pass=merge_linear_in_one_pass,
    )
)

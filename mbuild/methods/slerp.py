"""SLERP: spherical linear interpolation from the base model towards one other model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from mbuild.methods import Method, Parameter, register

if TYPE_CHECKING:
    import torch

# Above this |cos(angle)| the two tensors are treated as parallel and interpolated linearly,
# where the spherical formula would divide by a vanishing sin(angle).
DOT_THRESHOLD = 0.9995
# Norms at or below this are left undivided, so an all-zero tensor does not become NaN.
NORM_EPS = 1e-8
# Elements per row converted to the working dtype at once; bounds scratch memory.
CHUNK_ELEMENTS = 1024 * 1024


def merge_slerp(
    tensors: Sequence[torch.Tensor],
    *,
    base_index: int | None,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    generator: torch.Generator | None,
    dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    threads: int = 1,
) -> torch.Tensor:
    """Interpolate along the great circle from the base (t=0) to the other input (t=1).

    `dtype`: the compute dtype, when `tensors` are given as stored (each chunk is converted
    to it as it is read); None when they already are in it. `out_dtype`: the dtype to return
    the result in, each chunk checked finite first (NonFiniteResult); None: the compute dtype.
    `threads`: how many chunks are reduced at once (each by torch on one thread, combined in
    a fixed order, so the bytes are the same for any count).
    """
    import torch

    from mbuild.methods import map_in_threads, native, require_finite

    if base_index is None or len(tensors) != 2:
        raise ValueError("slerp needs exactly two inputs, one of them the base model")
    start, end = tensors[base_index], tensors[1 - base_index]
    dtype = dtype or start.dtype
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    # mergekit sees each output tensor as a batch holding one row and reduces along that row
    # in fixed-size chunks; reducing the same way reproduces its float32 rounding to the bit.
    a = start.reshape(1, -1)
    b = end.reshape(1, -1)
    t = torch.tensor(params["t"], dtype=work_dtype, device=start.device).reshape(1, 1)
    width = a.shape[1]
    final = out_dtype or dtype
    if width == 0:
        return torch.empty(start.shape, dtype=final, device=start.device)
    chunks = [slice(offset, offset + CHUNK_ELEMENTS) for offset in range(0, width, CHUNK_ELEMENTS)]

    def piece(row: torch.Tensor, chunk: slice, to: torch.dtype) -> torch.Tensor:
        """A chunk of an input in the compute dtype, then in `to` (as mergekit's two casts)."""
        return row[:, chunk].to(dtype).to(to)

    # float32 math from float32 or bfloat16 rows on the CPU: chunks are converted into a
    # scratch row, and the dot's element-wise half runs in the C loop. Either way torch
    # reduces the same float32 values, so the bytes do not change. A bfloat16 compute dtype
    # over bfloat16 rows converts nothing (the math is float32 all the same), so it qualifies.
    same_bf16 = dtype == a.dtype == b.dtype == torch.bfloat16
    native_rows = (dtype == torch.float32 or same_bf16) and native.library_for(a, b, contiguous=True) is not None

    def scratch_row() -> torch.Tensor | None:
        return torch.empty((1, min(width, CHUNK_ELEMENTS)), dtype=work_dtype) if native_rows else None

    def converted(row: torch.Tensor, chunk: slice, scratch: torch.Tensor | None) -> torch.Tensor:
        if scratch is None:
            return piece(row, chunk, work_dtype)
        part = row[:, chunk]
        if part.dtype == work_dtype:
            return part  # already float32: as `piece` would, no copy
        return scratch[:, : part.shape[1]].copy_(part)

    def chunk_norms(chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
        scratch = scratch_row()
        return tuple(torch.linalg.vector_norm(converted(row, chunk, scratch), dim=1, keepdim=True) for row in (a, b))

    # Each chunk's norm and dot part on one thread; the parts combined in chunk order.
    norm_parts = map_in_threads(chunk_norms, chunks, threads)
    norm_a = torch.linalg.vector_norm(torch.stack([part[0] for part in norm_parts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([part[1] for part in norm_parts]), dim=0)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, 1)

    def dot_part(chunk: slice) -> torch.Tensor:
        # Dividing by the norms before multiplying keeps large weights from overflowing the dot.
        # (In-place steps on fresh scratch: the same roundings as the plain expression, fewer buffers.)
        if native_rows:
            scaled = _scaled_product(a, b, chunk, float(norm_a), float(norm_b), scratch_row())
        else:
            scaled = piece(a, chunk, work_dtype) / norm_a
            scaled.mul_(piece(b, chunk, work_dtype) / norm_b)
        return scaled.sum(dim=1, keepdim=True)

    dot = torch.stack(map_in_threads(dot_part, chunks, threads)).sum(dim=0).clamp(-1, 1)

    parallel = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(parallel, 0, dot))
    sin_theta = torch.sin(theta)
    weight_a = torch.where(parallel, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    weight_b = torch.where(parallel, t, torch.sin(t * theta) / sin_theta)

    result = torch.empty(a.shape, dtype=final, device=a.device)
    # bfloat16 math into a bfloat16 result: the one rounding is the C loop's, which also checks
    # the rounded values finite (as `combine` checks its bfloat16 values).
    natively = dtype == torch.float32 or (same_bf16 and final == torch.bfloat16)
    if out_dtype is not None and natively and _combine_natively(a, b, weight_a, weight_b, result, threads, dtype):
        return result.reshape(start.shape)

    # In the compute dtype, as mergekit's: rounded once per chunk.
    def combine(chunk: slice) -> None:
        part = result[:, chunk]
        if dtype == work_dtype:
            # weight_a * a + weight_b * b, each product rounded, then the sum (in place when
            # the result is in the compute dtype).
            value = part if final == work_dtype else torch.empty(part.shape, dtype=work_dtype, device=a.device)
            torch.mul(weight_a, piece(a, chunk, work_dtype), out=value)
            value.add_(weight_b * piece(b, chunk, work_dtype))
        else:
            value = (weight_a * piece(a, chunk, work_dtype) + weight_b * piece(b, chunk, work_dtype)).to(dtype)
        if out_dtype is not None:
            require_finite(value)
        if value is not part:
            part.copy_(value)

    map_in_threads(combine, chunks, threads)
    return result.reshape(start.shape)


def _combine_natively(a, b, weight_a, weight_b, result, threads: int, dtype) -> bool:
    """The last pass in the C loop (float32 math) straight into `result`; False where it does not apply.

    `dtype`: the compute dtype; bfloat16 (inputs and result bfloat16) checks the rounded values finite.
    """
    import ctypes

    import torch

    from mbuild.methods import NonFiniteResult, native

    library = native.library_for(a, b, result, contiguous=True)
    if library is None:
        return False
    status = library.mbuild_slerp_combine(
        a.data_ptr(), a.dtype == torch.bfloat16, b.data_ptr(), b.dtype == torch.bfloat16, a.numel(),
        float(weight_a), float(weight_b), result.data_ptr(),
        2 if dtype == torch.bfloat16 else int(result.dtype == torch.bfloat16), threads,
    )
    if status:
        raise NonFiniteResult("non-finite result")
    return True


def _scaled_product(a, b, chunk: slice, norm_a: float, norm_b: float, scratch) -> torch.Tensor:
    """(a / norm_a) * (b / norm_b) over one chunk, in float32, into the scratch row."""
    import torch

    from mbuild.methods import native

    count = a[:, chunk].shape[1]
    out = scratch[:, :count]
    native.library().mbuild_scaled_product(
        a.data_ptr() + chunk.start * a.element_size(), a.dtype == torch.bfloat16,
        b.data_ptr() + chunk.start * b.element_size(), b.dtype == torch.bfloat16,
        count, norm_a, norm_b, out.data_ptr(),
    )
    return out


register(
    Method(
        name="slerp",
        kernel=merge_slerp,
        parameters=(
            Parameter(
                "t",
                float,
                per_model=False,
                minimum=0.0,
                maximum=1.0,
                doc="interpolation factor: 0 gives the base model, 1 the other model",
            ),
        ),
        paper="https://en.wikipedia.org/wiki/Slerp",
        temporaries=lambda m, size: 0.5 * size,  # its C loops work a chunk at a time
        base="required",
        min_models=2,
        max_models=2,
        summary="spherical interpolation between the base model and one other",
        stored_inputs=True,
        casts_output=True,
        threaded=True,
    )
)

"""The task-arithmetic family: task arithmetic, TIES, DARE, breadcrumbs and DELLA (linear and TIES).

Every member adds weighted task vectors (model minus base) to the base. They differ in
two optional steps, so each member is one row of data: how each task vector is thinned
(a sparsifier) and whether the vectors vote on a sign per element (a consensus). Adding
a member is adding a sparsifier (if it thins in a new way) and a row in VARIANTS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from mbuild.methods import Method, Parameter, register
from mbuild.methods.ranking import select_largest

if TYPE_CHECKING:
    import torch

# Below this L1 norm a task vector is not rescaled after masking (nothing meaningful to preserve).
RESCALE_EPS = 1e-7
# A total weight this close to zero is not divided by when normalizing.
WEIGHT_EPS = 1e-8
# Elements per slice when the thinned task vectors are weighed, voted on and summed.
COMBINE_SLICE = 1 << 16
# Elements per slice when TIES recomputes task vectors from its inputs after ranking them
# (see `TaskArithmeticVariant._merge_selected`): large enough that each pass of C is long.
SELECTED_SLICE = 1 << 20


def _masked(delta: torch.Tensor, mask: torch.Tensor, rescale: bool, in_place: bool = False) -> torch.Tensor:
    """Return `delta * mask`, scaled back to the L1 norm of `delta` when `rescale` is on.

    `in_place` masks `delta` itself (same bytes, one buffer less) when the caller owns it.
    """
    import torch

    norm_before = delta.abs().sum() if rescale else None
    kept = delta.mul_(mask) if in_place else delta * mask
    if not rescale:
        return kept
    norm_after = kept.abs().sum()
    if not (norm_before.isfinite() and norm_after.isfinite()):
        # A float16 sum overflows past 65504 and mergekit's ratio becomes NaN; float32 sums keep
        # the bytes equal to mergekit's wherever its answer is finite.
        if in_place:
            raise ValueError("float16 rescale overflow needs the unmasked delta; call without in_place")
        norm_before = delta.abs().sum(dtype=torch.float32)
        norm_after = kept.abs().sum(dtype=torch.float32)
    if norm_before < RESCALE_EPS or norm_after < RESCALE_EPS:
        return kept
    return kept.mul_(norm_before / norm_after) if in_place else kept * (norm_before / norm_after)


def keep_largest(
    delta: torch.Tensor, settings: Mapping[str, Any], rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep the `density` fraction of elements largest in magnitude (at least one), zero the rest."""
    import torch

    density = settings["density"]
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    count = max(1, int(density * delta.numel()))
    # Rank in float32 on every device (mergekit does on CPU): exact for 16-bit magnitudes, and
    # argsort's order among equal magnitudes (common in bf16) then picks mergekit's survivors.
    # On CPU the same survivors are found without sorting (ranking.py); elsewhere, or where this
    # torch sorts another way, by the argsort itself (not stable=True: we pick what it picks).
    flat = delta.reshape(-1)
    magnitudes = _magnitudes(flat, torch.empty(flat.numel(), dtype=torch.float32, device=flat.device))
    on_cpu = magnitudes.device.type == "cpu"
    selected = select_largest(magnitudes, count) if on_cpu else None  # uses magnitudes as scratch
    if selected is not None:
        del magnitudes  # free before the mask: peak memory is a few tensors, not several more
        threshold, at_threshold = selected
        if not rescale:
            return _keep_selected(flat, threshold, at_threshold).reshape_as(delta)
        mask = torch.empty(flat.shape, dtype=torch.bool)
        for start in range(0, flat.numel(), COMBINE_SLICE):
            stop = start + COMBINE_SLICE
            torch.gt(flat[start:stop].abs().float(), threshold, out=mask[start:stop])
        mask[at_threshold] = True
    else:
        if on_cpu:  # a declined selection may have left the magnitudes permuted
            magnitudes = delta.abs().reshape(-1).float()
        order = torch.argsort(magnitudes, descending=True)
        del magnitudes
        mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
        mask[order[:count]] = 1
        del order
    # The delta here is the merge's own scratch: mask it in place (float16 rescaling keeps a copy).
    in_place = not (rescale and delta.dtype == torch.float16)
    return _masked(delta, mask.reshape_as(delta), rescale, in_place=in_place)


def _magnitudes(flat: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """|flat| as float32 into `out` (exact for every 16-bit value), in one pass of C where it can."""
    half, kind = _half_native(flat)
    if half is not None:
        half.mbuild_magnitudes16(flat.data_ptr(), kind, flat.numel(), out.data_ptr())
        return out
    return out.copy_(flat.abs())


def _keep_selected(flat: torch.Tensor, threshold: float, at_threshold: torch.Tensor) -> torch.Tensor:
    """`flat * (|flat| > threshold)` in place, with the kept ties (`at_threshold`) left as they were.

    A dropped negative becomes -0.0, as the product does in mergekit.
    """
    import ctypes

    kept_ties = flat[at_threshold]
    library = _native_for(flat)
    half, kind = _half_native(flat)
    if library is not None:
        library.mbuild_keep_above(flat.data_ptr(), flat.numel(), ctypes.c_float(threshold))
    elif half is not None:
        half.mbuild_keep_above16(flat.data_ptr(), kind, flat.numel(), ctypes.c_float(threshold))
    else:
        for start in range(0, flat.numel(), COMBINE_SLICE):
            piece = flat[start : start + COMBINE_SLICE]
            piece.mul_(piece.abs().float() > threshold)
    flat[at_threshold] = kept_ties
    return flat


def _selection(
    tensor: torch.Tensor, base: torch.Tensor, settings: Mapping[str, Any], dtype: torch.dtype
) -> tuple[float, torch.Tensor] | bool | None:
    """What `keep_largest` keeps of `tensor - base` (in `dtype`), found a slice of the task
    vector at a time: (threshold, sorted positions of the kept magnitudes equal to it), True
    (all kept), False (none), or None where the selection declines (argsort decides then).

    Only the float32 magnitudes are held whole (and the selection's positions), not the task
    vector itself: the largest tasks, a vocabulary-sized head, then fit in a third less memory.
    """
    import torch

    density = settings["density"]
    total = base.numel()
    if density >= 1:
        return True
    if density <= 0 or total == 0:
        return False
    count = max(1, int(density * total))
    flat_tensor, flat_base = tensor.reshape(-1), base.reshape(-1)
    magnitudes = torch.empty(total, dtype=torch.float32)
    scratch = torch.empty(min(total, SELECTED_SLICE), dtype=dtype)
    for start in range(0, total, SELECTED_SLICE):
        stop = min(total, start + SELECTED_SLICE)
        delta = _difference(flat_tensor[start:stop], flat_base[start:stop], out=scratch[: stop - start])
        _magnitudes(delta, magnitudes[start:stop])
    del scratch
    return select_largest(magnitudes, count)


def keep_random(
    delta: torch.Tensor, settings: Mapping[str, Any], rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Keep each element with probability `density` (DARE), drawing from `generator` only."""
    import torch

    if generator is None:
        raise ValueError("random sparsification needs a torch.Generator; the global RNG is never used")
    density = settings["density"]
    if density >= 1:
        return delta
    # Draw from float32 probabilities whatever the compute dtype: the density is not rounded
    # to 16 bits, bernoulli works for every dtype on CPU, and one seed gives one mask.
    work_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    # The mask is drawn where the generator lives (the engine passes a CPU one) and then
    # moved, so one seed gives the same mask on every device.
    probabilities = torch.full(delta.shape, density, dtype=torch.float32, device=generator.device)
    mask = torch.bernoulli(probabilities, generator=generator).to(device=delta.device, dtype=work_dtype)
    return _masked(delta.to(work_dtype), mask, rescale).to(delta.dtype)


def keep_between_outliers(
    delta: torch.Tensor, settings: Mapping[str, Any], rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Breadcrumbs: drop the `gamma` fraction largest in magnitude, then the smallest, keeping `density`."""
    import torch

    density = settings["density"]
    if density >= 1:
        return delta
    total = delta.numel()
    kept = int(density * total)
    outliers = int(settings["gamma"] * total)
    # Fewer outliers are dropped when dropping them all would leave less than `density`.
    smallest = max(0, total - kept - outliers)
    # Float32 magnitudes, as keep_largest: the same order (ties included) as mergekit on CPU.
    ascending = torch.sort(delta.abs().reshape(-1).float()).indices
    mask = torch.zeros(total, dtype=delta.dtype, device=delta.device)
    mask[ascending[smallest : smallest + kept]] = 1
    return _masked(delta, mask.reshape_as(delta), rescale)


def della_problem(settings: Mapping[str, Any]) -> str | None:
    """Why DELLA cannot thin a task vector with these per-model values, or None.

    mergekit's della_magprune refuses a density strictly between 0 and 1 unless
    density - epsilon > 0 and density + epsilon < 1 (keep probabilities run from one to
    the other); a density of 0 or 1 and above keeps nothing or everything, epsilon unread.
    """
    density, epsilon = settings["density"], settings["epsilon"]
    if 0 < density < 1 and (density - epsilon <= 0 or density + epsilon >= 1):
        return (
            f"DELLA needs density - epsilon > 0 and density + epsilon < 1 (mergekit: 'density +/- epsilon "
            f"is in (0, 1)'); got density {density:g}, epsilon {epsilon:g}"
        )
    return None


def keep_by_magnitude_rank(
    delta: torch.Tensor, settings: Mapping[str, Any], rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA's MagPrune: keep each element with a probability rising linearly with its magnitude's rank."""
    import torch

    if generator is None:
        raise ValueError("random sparsification needs a torch.Generator; the global RNG is never used")
    density, epsilon = settings["density"], settings["epsilon"]
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    problem = della_problem(settings)
    if problem:
        raise ValueError(problem)
    work_dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    # Ranks run along dim 1 (a 1-D or 0-D tensor is one row), as in mergekit. They and the
    # probabilities are computed where the generator lives and in float32, so one seed gives
    # one mask on every device and in every compute dtype (as DARE's keep_random).
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    magnitudes = rows.abs().to(device=generator.device, dtype=work_dtype)
    order = torch.argsort(magnitudes, dim=1)
    position_shape = [1] * rows.ndim
    position_shape[1] = rows.shape[1]
    positions = torch.arange(rows.shape[1], device=order.device).reshape(position_shape).expand_as(order)
    # Inverting the sorting permutation gives each element's rank (1 = smallest magnitude).
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(work_dtype) + 1
    lowest = ranks.amin(dim=1, keepdim=True)
    span = ranks.amax(dim=1, keepdim=True) - lowest
    scaled = ((ranks - lowest) / span).clamp(0, 1)
    # A row of one element has no rank spread: it is kept with probability `density`.
    scaled = torch.where(span > 0, scaled, 0.5)
    probabilities = (density - epsilon) + scaled * 2 * epsilon
    mask = torch.bernoulli(probabilities, generator=generator).to(device=delta.device, dtype=work_dtype)
    return _masked(rows.to(work_dtype), mask, rescale).to(delta.dtype).reshape(delta.shape)


@dataclass(frozen=True)
class Sparsifier:
    """A way to thin a task vector, with the per-model parameters it reads beyond `density`."""

    keep: Callable[..., "torch.Tensor"]  # (delta, model settings, rescale, generator) -> thinned delta
    random: bool
    parameters: tuple[Parameter, ...] = ()
    # Why one model's settings cannot be used together, or None (`Method.check_input`).
    check: Callable[[Mapping[str, Any]], str | None] | None = None


SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": Sparsifier(keep_largest, random=False),
    "random": Sparsifier(keep_random, random=True),
    "magnitude_outliers": Sparsifier(
        keep_between_outliers,
        random=False,
        parameters=(
            Parameter(
                "gamma",
                float,
                per_model=True,
                default=0.01,
                minimum=0.0,
                maximum=1.0,
                applies_to_base=False,
                doc="fraction of the task vector's largest changes dropped as outliers",
            ),
        ),
    ),
    "della_magprune": Sparsifier(
        keep_by_magnitude_rank,
        random=True,
        check=della_problem,
        parameters=(
            Parameter(
                "epsilon",
                float,
                per_model=True,
                default=0.15,
                minimum=0.0,
                maximum=1.0,
                applies_to_base=False,
                doc="keep probabilities run from density - epsilon (smallest) to density + epsilon (largest)",
            ),
        ),
    ),
}


def _difference(tensor: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`tensor - base` in `out`'s dtype, written into `out`, converting a slice at a time."""
    import torch

    if tensor.dtype == base.dtype == out.dtype:
        return torch.sub(tensor, base, out=out)
    flat_tensor, flat_base, flat_out = tensor.reshape(-1), base.reshape(-1), out.view(-1)
    library = _native_for(out, tensor, base)
    if library is not None:
        # One pass in C: each element converted and subtracted, the same single rounding.
        flat_tensor, flat_base = flat_tensor.contiguous(), flat_base.contiguous()
        library.mbuild_task_vector(
            flat_tensor.data_ptr(), int(tensor.dtype == torch.bfloat16), flat_base.data_ptr(),
            int(base.dtype == torch.bfloat16), flat_out.numel(), flat_out.data_ptr(),
        )
        return out
    for start in range(0, flat_out.numel(), COMBINE_SLICE):
        stop = start + COMBINE_SLICE
        torch.sub(flat_tensor[start:stop].to(out.dtype), flat_base[start:stop].to(out.dtype), out=flat_out[start:stop])
    return out


def _native_for(out: torch.Tensor, *inputs: torch.Tensor):
    """The C loops, where `out` is contiguous float32 on the CPU and `inputs` float32 or bfloat16 there."""
    import torch

    from mbuild.methods import native

    return native.library_for(out, *inputs) if out.dtype == torch.float32 and out.is_contiguous() else None


def _half_native(*tensors):
    """(the C loops, their dtype code) where `tensors` share bfloat16 or float16, contiguous on
    the CPU, and the extension was built; else (None, 0)."""
    from mbuild.methods import native

    kind = native.half_kind(*tensors)
    library = native.library() if kind else None
    return (library, kind) if library is not None else (None, 0)


def _combine_natively(
    deltas: torch.Tensor, weights: Sequence[float], base: torch.Tensor, params: Mapping[str, Any]
) -> torch.Tensor | None:
    """The sum-consensus combine and the base added, by the C loop in `_kernels.c`, or None.

    It applies to float32 task vectors on the CPU over a float32 or bfloat16 base, and to
    bfloat16 or float16 ones (each op rounded as torch rounds it), up to 4 task vectors (from
    5, torch's sum over models is not a plain sequence of additions); it runs mergekit's
    operations in mergekit's order, one element at a time, so the bytes are those of
    `_combine` (the mask dtype cannot change them: signs are compared only).
    """
    import ctypes

    import torch

    if not 1 <= deltas.shape[0] <= 4:
        return None
    rows = deltas.reshape(deltas.shape[0], -1).contiguous()
    scale = params["lambda"] != 1
    if deltas.dtype in (torch.bfloat16, torch.float16):
        # 16-bit math: the base in the compute dtype (as mergekit reads it) and the weights
        # rounded to it (as mergekit's torch.tensor(weights, dtype=...) makes them).
        flat_base = base.reshape(-1).to(deltas.dtype).contiguous()
        half, kind = _half_native(rows, flat_base)
        if half is None:
            return None
        scales = torch.tensor(weights, dtype=deltas.dtype).float()
        merged = torch.empty(flat_base.shape, dtype=deltas.dtype)
        status = half.mbuild_ties_combine16(
            rows.data_ptr(), rows.shape[0], rows.shape[1], scales.data_ptr(), flat_base.data_ptr(), kind,
            int(bool(params["normalize"])), int(scale), ctypes.c_float(params["lambda"]), merged.data_ptr(), 0,
        )
        return merged if status == 0 else None
    library = _native_for(deltas, base)
    if library is None:
        return None
    flat_base = base.reshape(-1).contiguous()
    scales = torch.tensor(weights, dtype=torch.float32)
    merged = torch.empty(flat_base.shape, dtype=torch.float32)
    status = library.mbuild_ties_combine(
        rows.data_ptr(), rows.shape[0], rows.shape[1], scales.data_ptr(), flat_base.data_ptr(),
        int(base.dtype == torch.bfloat16), int(bool(params["normalize"])), int(scale), ctypes.c_float(params["lambda"]),
        merged.data_ptr(),
    )
    return merged if status == 0 else None


def _sign_by_sum(deltas: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Elect per element the sign of the summed (weighted) task vectors."""
    return deltas.sum(dim=0) >= 0


def _sign_by_count(deltas: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Elect per element the sign held by more task vectors."""
    return signs.sum(dim=0) >= 0


# Each returns True where the elected sign is positive; ties elect positive.
CONSENSUS: dict[str, Callable[..., "torch.Tensor"]] = {"sum": _sign_by_sum, "count": _sign_by_count}


def agreement_mask(deltas: torch.Tensor, consensus: str, mask_dtype: torch.dtype) -> torch.Tensor:
    """Return a bool mask, per task vector and element, of entries whose sign matches the elected one."""
    signs = deltas.sign().to(mask_dtype)
    elected = CONSENSUS[consensus](deltas, signs).to(mask_dtype) * 2 - 1
    return signs == elected


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One member of the family, as data: how task vectors are thinned and whether they vote."""

    name: str
    sparsification: str | None
    consensus: str | None
    normalize: bool
    rescale: bool
    paper: str
    summary: str
    temporaries: Callable[[int, int], float] | None = None  # see Method.temporaries

    def method(self) -> Method:
        """Return this variant's declaration, with its kernel and parameters."""
        sparsifier = SPARSIFIERS[self.sparsification] if self.sparsification else None
        extra = sparsifier.parameters if sparsifier else ()
        return Method(
            name=self.name,
            kernel=self.merge,
            parameters=(
                Parameter("weight", float, per_model=True, applies_to_base=False, doc="scale of this task vector"),
                Parameter(
                    "density",
                    float,
                    per_model=True,
                    default=1.0,
                    minimum=0.0,
                    maximum=1.0,
                    applies_to_base=False,
                    doc="fraction of the task vector kept",
                ),
                *extra,
                Parameter(
                    "normalize", bool, per_model=False, default=self.normalize, doc="divide by the sum of the weights"
                ),
                Parameter(
                    "rescale",
                    bool,
                    per_model=False,
                    default=self.rescale,
                    doc="scale a thinned task vector back to its L1 norm",
                ),
                Parameter("lambda", float, per_model=False, default=1.0, doc="scale of the merged task vector"),
                Parameter(
                    "int8_mask", bool, per_model=False, default=False, doc="hold the sign mask in int8 to save memory"
                ),
            ),
            paper=self.paper,
            base="required",
            random=bool(sparsifier and sparsifier.random),
            summary=self.summary,
            # Thinning ranks or draws over a whole task vector; without it all is per element.
            elementwise=sparsifier is None,
            stored_inputs=True,
            check_input=sparsifier.check if sparsifier else None,
            temporaries=self.temporaries,
        )

    def merge(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        base_index: int | None,
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
        generator: torch.Generator | None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Add the weighted, thinned and sign-agreeing task vectors to the base.

        `dtype`: the compute dtype, when `tensors` are given as stored (converted here a
        slice at a time); None when they already are in it.
        """
        import torch

        if base_index is None:
            raise ValueError(f"{self.name} needs a base model")
        base = tensors[base_index]
        dtype = dtype or base.dtype
        others = [index for index in range(len(tensors)) if index != base_index]
        if not others:
            return base.to(dtype, copy=True)
        sparsifier = SPARSIFIERS[self.sparsification] if self.sparsification else None
        weight_values = [model_params[index]["weight"] for index in others]
        if sparsifier is SPARSIFIERS["magnitude"] and not params["rescale"] and base.device.type == "cpu":
            selections = [_selection(tensors[index], base, model_params[index], dtype) for index in others]
            if all(selection is not None for selection in selections):
                return self._merge_selected([tensors[index] for index in others], base, selections, weight_values,
                                            params, dtype)

        # One stacked buffer in the compute dtype, reduced over dim 0 below: the same sums,
        # and so the same rounding, as mergekit.
        deltas = torch.empty((len(others), *base.shape), dtype=dtype, device=base.device)
        for row, index in enumerate(others):
            # Each task vector is computed into its own row: the sparsifiers may thin it there.
            delta = _difference(tensors[index], base, out=deltas[row])
            if sparsifier is not None:
                thinned = sparsifier.keep(delta, model_params[index], params["rescale"], generator)
                if thinned is not delta:
                    deltas[row] = thinned
                del thinned
            del delta
        merged = torch.empty(base.numel(), dtype=dtype, device=base.device)
        self._combine_into(deltas.reshape(len(others), -1), weight_values, base.reshape(-1), params, merged)
        return merged.reshape(base.shape)

    def _merge_selected(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor,
        selections: Sequence[tuple[float, torch.Tensor] | bool],
        weight_values: Sequence[float],
        params: Mapping[str, Any],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """TIES without holding a task vector: each slice's task vectors recomputed from the
        inputs, thinned by the selections made beforehand (`_selection`), then combined.

        The same operations on the same values as the stacked path, element by element, so
        the same bytes; the working memory is the output and one slice per model instead of
        a whole task vector per model.
        """
        import torch

        flat_tensors = [tensor.reshape(-1) for tensor in tensors]
        flat_base = base.reshape(-1)
        total = flat_base.numel()
        merged = torch.empty(total, dtype=dtype)
        buffer = torch.empty(len(tensors) * min(total, SELECTED_SLICE), dtype=dtype)
        for start in range(0, total, SELECTED_SLICE):
            stop = min(total, start + SELECTED_SLICE)
            piece = buffer[: len(tensors) * (stop - start)].view(len(tensors), stop - start)  # contiguous: C takes it
            for row, (flat, selection) in enumerate(zip(flat_tensors, selections)):
                delta = _difference(flat[start:stop], flat_base[start:stop], out=piece[row])
                if selection is False:
                    delta.zero_()
                elif selection is not True:
                    threshold, at_threshold = selection
                    # The kept ties in this slice: `at_threshold` is ascending.
                    bounds = torch.tensor([start, stop], dtype=at_threshold.dtype)
                    low, high = torch.searchsorted(at_threshold, bounds).tolist()
                    _keep_selected(delta, threshold, at_threshold[low:high] - start)
            self._combine_into(piece, weight_values, flat_base[start:stop], params, merged[start:stop])
        return merged.reshape(base.shape)

    def _combine_into(
        self,
        rows: torch.Tensor,
        weight_values: Sequence[float],
        flat_base: torch.Tensor,
        params: Mapping[str, Any],
        out: torch.Tensor,
    ) -> None:
        """`out` = the base plus the merged task vector of `rows` (models x elements, thinned)."""
        import torch

        if self.consensus == "sum":
            native = _combine_natively(rows, weight_values, flat_base, params)
            if native is not None:
                out.copy_(native)
                return
        weights = torch.tensor(weight_values, dtype=rows.dtype, device=rows.device).reshape(len(weight_values), 1)
        # What follows is element-wise across the models: done a slice at a time, its
        # temporaries stay cache-sized instead of a dozen tensor-sized buffers.
        for start in range(0, flat_base.numel(), COMBINE_SLICE):
            stop = start + COMBINE_SLICE
            mixed = self._combine(rows[:, start:stop], weights, params)
            torch.add(flat_base[start:stop].to(rows.dtype), mixed, out=out[start:stop])

    def _combine(self, deltas: torch.Tensor, weights: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        """The merged task vector of a slice (models x elements) of the thinned task vectors."""
        import torch

        deltas = deltas * weights
        if self.consensus is not None:
            mask_dtype = torch.int8 if params["int8_mask"] else deltas.dtype
            agree = agreement_mask(deltas, self.consensus, mask_dtype)
            mixed = deltas.mul_(agree).sum(dim=0)
            # Normalize by the weight of the models that actually contributed to each element.
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            # float16 rounds 1e-8 to 0, so mergekit divides by a zero total there; compare in
            # float32 (exact for float16, same answer as mergekit for every other dtype).
            magnitude = divisor.abs() if divisor.dtype != torch.float16 else divisor.float().abs()
            divisor[magnitude < WEIGHT_EPS] = 1
        del deltas

        if params["normalize"]:
            mixed /= divisor
        if params["lambda"] != 1:
            mixed *= params["lambda"]
        return mixed


VARIANTS: tuple[TaskArithmeticVariant, ...] = (
    TaskArithmeticVariant(
        name="task_arithmetic",
        sparsification=None,
        consensus=None,
        normalize=False,
        rescale=False,
        paper="https://arxiv.org/abs/2212.04089",
        summary="add weighted task vectors (model minus base) to the base",
    ),
    TaskArithmeticVariant(
        name="ties",
        sparsification="magnitude",
        consensus="sum",
        normalize=True,
        rescale=False,
        paper="https://arxiv.org/abs/2306.01708",
        summary="task arithmetic keeping the largest changes and only those agreeing in sign (TIES)",
        # float32 magnitudes and the ranking's int32 positions, whole; the kept ties per model
        temporaries=lambda m, size: 8.5 + 0.75 * m,
    ),
    TaskArithmeticVariant(
        name="dare_linear",
        sparsification="random",
        consensus=None,
        normalize=False,
        rescale=True,
        paper="https://arxiv.org/abs/2311.03099",
        summary="task arithmetic on randomly dropped and rescaled task vectors (DARE)",
    ),
    TaskArithmeticVariant(
        name="dare_ties",
        sparsification="random",
        consensus="sum",
        normalize=False,
        rescale=True,
        paper="https://arxiv.org/abs/2311.03099",
        summary="DARE's random drop with TIES' sign consensus",
        temporaries=lambda m, size: (m + 2) * size,
    ),
    TaskArithmeticVariant(
        name="breadcrumbs",
        sparsification="magnitude_outliers",
        consensus=None,
        normalize=False,
        rescale=False,
        paper="https://arxiv.org/abs/2312.06795",
        summary="task arithmetic dropping both the smallest and the largest changes (Model Breadcrumbs)",
    ),
    TaskArithmeticVariant(
        name="breadcrumbs_ties",
        sparsification="magnitude_outliers",
        consensus="sum",
        normalize=False,
        rescale=False,
        paper="https://arxiv.org/abs/2312.06795",
        summary="Model Breadcrumbs' sparsification with TIES' sign consensus",
    ),
    TaskArithmeticVariant(
        name="della",
        sparsification="della_magprune",
        consensus="sum",
        normalize=True,
        rescale=True,
        paper="https://arxiv.org/abs/2406.11617",
        summary="random drop favouring small changes (DELLA MagPrune) with TIES' sign consensus",
        temporaries=lambda m, size: (3 * m + 1) * size,
    ),
    TaskArithmeticVariant(
        name="della_linear",
        sparsification="della_magprune",
        consensus=None,
        normalize=False,
        rescale=True,
        paper="https://arxiv.org/abs/2406.11617",
        summary="task arithmetic on task vectors thinned by DELLA's magnitude-ranked random drop",
    ),
)

for _variant in VARIANTS:
    register(_variant.method())
del _variant

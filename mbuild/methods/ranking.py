"""Which elements torch's CPU sort ranks first, found without sorting.

mergekit's magnitude sparsification keeps `argsort(|delta|, descending=True)[:count]`. Among
equal magnitudes (bf16 task vectors have hundreds of thousands at the cut) the survivors are
whatever that sort's tie order makes them, so matching mergekit's bytes means matching it.

torch's CPU sort of one contiguous row is libstdc++'s `std::sort`: introsort, which moves the
median of (second, middle, last) to the front, splits the range with an unguarded Hoare
partition around it, recurses until ranges hold 16 elements or fewer, and finishes with an
insertion sort (stable inside each such range). Partitions are deterministic, so only the
ranges that contain the cut (position `count`) need to be followed: one partition per level,
each over a range about half the size of the last, then a stable sort of at most 16 elements.
That is linear work instead of a full sort, and picks exactly the same elements.

The walk runs in C (`_kernels.c`, an optional extension built at install) or, where it
was not built, in numpy (`_select_numpy`, which reads each partition's swaps off per-block
stop counts); both must pick the same elements.

Another build of torch may sort another way (x86-simd-sort, a parallel sort, a new libstdc++),
so `matches_torch_sort` compares the two on a few arrays once per process and callers fall
back to argsort where they differ.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

# libstdc++'s _S_threshold: ranges this small are left to the final insertion sort.
INSERTION_THRESHOLD = 16


class Unfollowed(Exception):
    """The sort leaves the path this module follows (introsort's heapsort fallback, NaN keys)."""


def _median_position(keys: np.ndarray) -> int:
    """Where std::__move_median_to_first(first, first + 1, mid, last - 1) takes the pivot from (comp = greater)."""
    size = keys.shape[0]
    a, b, c = 1, size // 2, size - 1
    ka, kb, kc = keys[a], keys[b], keys[c]
    if ka > kb:
        return b if kb > kc else (c if ka > kc else a)
    if ka > kc:
        return a
    return c if kb > kc else b


# Stop counts are taken per block of this many elements to find where the scanners cross.
_BLOCK = 1 << 14


def _block_counts(stops: np.ndarray) -> np.ndarray:
    """Cumulative count of True in `stops` at every block boundary (first entry 0, last the total)."""
    import numpy as np

    whole = stops.shape[0] // _BLOCK * _BLOCK
    counts = stops[:whole].reshape(-1, _BLOCK).view(np.uint8).sum(axis=1, dtype=np.int64)
    cumulative = np.zeros(counts.shape[0] + 2, dtype=np.int64)
    np.cumsum(counts, out=cumulative[1:-1])
    cumulative[-1] = cumulative[-2] + np.count_nonzero(stops[whole:])
    return cumulative


def _nth_true(stops: np.ndarray, cumulative: np.ndarray, rank: int) -> int:
    """Position of the True of 0-based `rank` in `stops`, found through its block counts."""
    import numpy as np

    block = int(np.searchsorted(cumulative, rank, side="right")) - 1
    start = block * _BLOCK
    local = np.flatnonzero(stops[start : start + _BLOCK])
    return start + int(local[rank - cumulative[block]])


def _hoare_swaps(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The swaps of std::__unguarded_partition around keys[0] (comp = greater), and the cut.

    The left scanner stops at every element not greater than the pivot, the right scanner at
    every element not smaller; the t-th stops swap while the left one is before the right one.
    Scanning only ever meets untouched elements until the scanners cross, so the stops can be
    read off the original keys. With A(x) left stops before x and B(x) right stops from x on,
    the number of swaps is the largest min(A(x), B(x)): A rises and B falls, so it is found
    where they cross, first between block boundaries, then inside one block.

    Returns the swapped left positions (ascending), the swapped right positions (ascending:
    the first left one pairs with the last right one), and the cut.
    """
    import numpy as np

    pivot = keys[0]
    rest = keys[1:]  # positions are 1 + offsets into rest
    left_stops, right_stops = rest <= pivot, rest >= pivot
    left_count, right_count = _block_counts(left_stops), _block_counts(right_stops)
    total_left, total_right = int(left_count[-1]), int(right_count[-1])
    # A (left_count) and B (from_here) at block boundaries (offsets 0, _BLOCK, ..., len(rest)).
    from_here = total_right - right_count
    crossing = int(np.searchsorted(left_count - from_here, 0, side="left"))
    if crossing == 0:
        swaps = 0
    else:
        start = (crossing - 1) * _BLOCK
        stop = min(start + _BLOCK, rest.shape[0])
        a = left_count[crossing - 1] + np.concatenate([[0], np.cumsum(left_stops[start:stop], dtype=np.int64)])
        b = from_here[crossing - 1] - np.concatenate([[0], np.cumsum(right_stops[start:stop], dtype=np.int64)])
        swaps = int(np.minimum(a, b).max())
    if swaps == 0:
        if total_left == 0:
            raise Unfollowed("no element stops the left scanner")
        cut = 1 + _nth_true(left_stops, left_count, 0)
    else:
        # The left scanner also stops at the last swapped right position (it now holds a larger key).
        cut = 1 + _nth_true(right_stops, right_count, total_right - swaps)
        if swaps < total_left:
            cut = min(cut, 1 + _nth_true(left_stops, left_count, swaps))
    left = np.flatnonzero(left_stops[: cut - 1])
    right = np.flatnonzero(right_stops[cut - 1 :])
    if right.shape[0] == swaps + 1:
        right = right[1:]  # a key equal to the pivot at the cut, where the scanners met
    if left.shape[0] != swaps or right.shape[0] != swaps:
        raise Unfollowed("partition bookkeeping disagrees")  # never expected; argsort decides then
    left += 1
    right += cut
    return left, right, cut


def _select(keys: np.ndarray, count: int, depth_limit: int | None = None) -> tuple[float, np.ndarray]:
    """Where `argsort(keys, descending=True)[:count]` cuts under libstdc++'s introsort.

    Returns the smallest kept key and the positions of the kept keys equal to it. The walk
    runs in C where the optional extension was built (about 4x faster), else in numpy; both
    take the same path and pick the same elements. `keys` is scratch: it is left permuted.
    """
    from mbuild.methods import native

    library = native.library()
    if library is None:
        return _select_numpy(keys, count, depth_limit)
    return _select_native(library, keys, count, depth_limit)


def _depth_limit(size: int) -> int:
    """std::__lg(n) * 2: partitions introsort makes on one path before it turns to heapsort."""
    return 2 * (size.bit_length() - 1)


def _select_native(
    native, keys: np.ndarray, count: int, depth_limit: int | None = None, wide: bool | None = None
) -> tuple[float, np.ndarray]:
    """`_select` by the C walk in `_kernels.c`; `wide`: int64 positions (needed from 2**31 keys)."""
    import ctypes

    import numpy as np

    size = keys.shape[0]
    wide = size >= 2**31 if wide is None else wide
    index = np.empty(size, dtype=np.int64 if wide else np.int32)
    threshold = ctypes.c_float()
    follow = native.mbuild_follow_i64 if wide else native.mbuild_follow_i32
    limit = _depth_limit(size) if depth_limit is None else depth_limit
    status = follow(keys.ctypes.data, index.ctypes.data, size, count, limit, ctypes.byref(threshold))
    if status != 0:
        raise Unfollowed("introsort would switch to heapsort here" if status == 1 else "no cut found")
    value = np.float32(threshold.value)
    kept = keys[:count]
    return float(value), index[:count][kept == value]


def _select_numpy(keys: np.ndarray, count: int, depth_limit: int | None = None) -> tuple[float, np.ndarray]:
    """`_select` in numpy: the reference walk, used where the C one is not built.

    Returns the smallest kept key and the positions of the kept keys equal to it: the kept
    elements are those above it plus those. `keys` (float32, finite) is scratch: it is left
    permuted. Positions are tracked only for the part followed, which halves at every level.
    """
    import numpy as np

    size = keys.shape[0]
    int_type = np.int32 if size < 2**31 else np.int64
    # std::__lg(n) * 2 partitions deep at most, then heapsort (`depth_limit` overrides, for tests).
    depth_left = _depth_limit(size) if depth_limit is None else depth_limit
    # The original position of each key in the part followed; None while that is the identity.
    index: np.ndarray | None = None
    low, high = 0, size
    # Per partition whose left part is kept whole: (pivot, positions of kept keys equal to it).
    kept_at_pivot: list[tuple[float, np.ndarray]] = []
    last_pivot = None
    while low < count < high and high - low > INSERTION_THRESHOLD:
        if depth_left == 0:
            raise Unfollowed("introsort would switch to heapsort here")
        depth_left -= 1
        part = keys[low:high]
        chosen = _median_position(part)
        part[0], part[chosen] = part[chosen], part[0]
        if index is None:
            # First partition: positions are original ones, but for the median swap.
            def origin(positions: np.ndarray, chosen: int = chosen) -> np.ndarray:
                found = positions.astype(int_type)
                found[positions == chosen] = 0  # never position 0 itself: scanners start at 1
                return found

            def origin_range(start: int, stop: int, chosen: int = chosen) -> np.ndarray:
                found = np.arange(start, stop, dtype=int_type)
                if start <= chosen < stop:
                    found[chosen - start] = 0
                if start == 0:
                    found[0] = chosen
                return found

            pivot_origin = chosen
        else:
            index[0], index[chosen] = index[chosen], index[0]
            origin = index.__getitem__
            origin_range = lambda start, stop, index=index: index[start:stop]  # noqa: E731
            pivot_origin = index[0]
        left, right, cut = _hoare_swaps(part)
        pivot = part[0]
        # Only the part that holds the cut is brought up to date; left positions pair with
        # right ones in reverse order.
        paired = right[::-1]
        if count < low + cut:
            part[left] = part[paired]
            followed = origin_range(0, cut)
            followed[left] = origin(paired)
            high = low + cut
        else:
            # The left part is kept whole: its keys are >= pivot, and those equal to it are the
            # pivot itself and the equal right stops swapped in.
            equal = right[part[right] == pivot]
            kept_at_pivot.append((pivot, np.concatenate([np.array([pivot_origin], dtype=int_type), origin(equal)])))
            part[paired] = part[left]
            followed = origin_range(cut, part.shape[0])
            followed[paired - cut] = origin(left)
            low = low + cut
            last_pivot = pivot
        index = followed
    if count > low:
        # The cut lies inside a range the final insertion sort orders (stably, descending).
        leaf = keys[low:high]
        leaf_index = index if index is not None else np.arange(low, high, dtype=int_type)
        order = np.argsort(-leaf, kind="stable")[: count - low]
        threshold = leaf[order[-1]]
        at_threshold = leaf_index[order][leaf[order] == threshold]
    else:
        # The cut is exactly a partition boundary: everything left of it is kept.
        threshold, at_threshold = last_pivot, np.zeros(0, dtype=int_type)
    kept = [at_threshold] + [positions for pivot, positions in kept_at_pivot if pivot == threshold]
    return float(threshold), np.concatenate(kept)


def select_largest(magnitudes: torch.Tensor, count: int) -> tuple[float, torch.Tensor] | None:
    """Where `torch.argsort(magnitudes, descending=True)[:count]` cuts on CPU, or None.

    Returns the smallest kept magnitude and the ascending positions (int32 or int64) of the
    kept ones equal to it (all larger ones are kept). `magnitudes`, a 1-D float32 CPU tensor longer than `count`, is used
    as scratch. None means this torch sorts differently or the input leaves the followed path
    (NaN, heapsort): use argsort instead.
    """
    import numpy as np
    import torch

    if magnitudes.device.type != "cpu" or magnitudes.dtype != torch.float32 or not matches_torch_sort():
        return None
    keys = magnitudes.contiguous().numpy()
    # NaN carries through max and min, so two reductions check finiteness without a mask.
    if not 0 < count < keys.shape[0] or not (np.isfinite(keys.max()) and np.isfinite(keys.min())):
        return None
    try:
        threshold, at_threshold = _select(keys, count)
    except Unfollowed:
        return None
    # Ascending positions, int32 below 2**31 keys: half the memory where ties are millions.
    at_threshold.sort()
    return threshold, torch.from_numpy(at_threshold)


def largest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor | None:
    """Bool mask of `torch.argsort(magnitudes, descending=True)[:count]` on CPU, or None.

    As `select_largest`, but `magnitudes` is left as it is.
    """
    import torch

    if count >= magnitudes.numel():
        return torch.ones(magnitudes.shape, dtype=torch.bool)
    selected = select_largest(magnitudes.clone(), count)
    return None if selected is None else _kept(magnitudes, *selected)


def _kept(magnitudes: torch.Tensor, threshold: float, at_threshold: torch.Tensor) -> torch.Tensor:
    """The mask a selection stands for: every magnitude above `threshold`, and `at_threshold`."""
    mask = magnitudes > threshold
    mask[at_threshold] = True
    return mask


def _argsort_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    import torch

    mask = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    mask[torch.argsort(magnitudes, descending=True)[:count]] = True
    return mask


@functools.cache
def matches_torch_sort() -> bool:
    """Whether this torch's CPU argsort picks what `_select` picks, on a few tie-heavy arrays."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for size, distinct in ((200, 3), (5_000, 40), (60_000, 1_000), (60_001, 7)):
        values = torch.randint(0, distinct, (size,), generator=generator).float()
        for count in (1, size // 3, size // 2, size - 1):
            threshold, at_threshold = _select(values.numpy().copy(), count)
            picked = _kept(values, threshold, torch.from_numpy(at_threshold).long())
            if not torch.equal(picked, _argsort_mask(values, count)):
                return False
    return True

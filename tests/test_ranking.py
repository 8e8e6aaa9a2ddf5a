"""The sort-free selection of the largest magnitudes picks what torch's CPU argsort picks."""

import pytest
import torch

from mbuild.methods import native as c_loops
from mbuild.methods import ranking
from mbuild.methods.task_arithmetic import keep_largest


def argsort_pick(values: torch.Tensor, count: int) -> torch.Tensor:
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values, descending=True)[:count]] = True
    return mask


def test_this_torch_sorts_the_way_followed():
    # torch 2.13's CPU sort is libstdc++ introsort; if a torch sorts otherwise, the fast path is off.
    assert ranking.matches_torch_sort()


@pytest.mark.parametrize("size", [1, 2, 16, 17, 40, 129, 1_000, 16_385, 50_000, 200_001])
@pytest.mark.parametrize("distinct", [1, 2, 7, 1_000, 10**7])
def test_picks_what_argsort_picks_among_ties(native, size, distinct):
    generator = torch.Generator().manual_seed(size * 31 + distinct)
    values = torch.randint(0, distinct, (size,), generator=generator).float()
    for fraction in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999):
        count = max(1, int(fraction * size))
        picked = ranking.largest_mask(values, count)
        assert picked is not None
        assert int(picked.sum()) == count
        assert torch.equal(picked, argsort_pick(values, count)), (size, distinct, count)


def test_bf16_task_vector_with_many_ties_at_the_cut(native):
    generator = torch.Generator().manual_seed(5)
    # A fine-tune moves each weight by a fraction of it: in bf16 the change is a few ulps, so
    # the same magnitudes recur everywhere.
    base = torch.randn(3_000_000, generator=generator).mul(0.02).bfloat16()
    nudge = torch.randn(3_000_000, generator=generator).mul(0.01)
    fine_tune = (base.float() * (1 + nudge)).bfloat16()
    magnitudes = (fine_tune.float() - base.float()).abs()
    count = magnitudes.numel() // 2
    expected = argsort_pick(magnitudes, count)
    threshold = magnitudes[expected].min()
    ties = int((magnitudes == threshold).sum())
    kept_ties = int((magnitudes[expected] == threshold).sum())
    assert 0 < kept_ties < ties and ties > 1_000  # the tie order decides thousands of survivors
    before = magnitudes.clone()
    assert torch.equal(ranking.largest_mask(magnitudes, count), expected)
    assert torch.equal(magnitudes, before)  # the input is not used as scratch


def test_declines_where_it_cannot_follow_the_sort(monkeypatch):
    values = torch.rand(1_000)
    values[10] = float("nan")
    assert ranking.largest_mask(values, 100) is None
    assert ranking.largest_mask(torch.rand(1_000, dtype=torch.float64), 100) is None
    monkeypatch.setattr(ranking, "matches_torch_sort", lambda: False)
    assert ranking.largest_mask(torch.rand(1_000), 100) is None


def test_heapsort_fallback_is_declined(native):
    # A depth limit of zero is where introsort turns to heapsort, which is not followed.
    with pytest.raises(ranking.Unfollowed):
        ranking._select(torch.rand(1_000).numpy(), 500, depth_limit=0)


def test_the_c_and_numpy_walks_agree_with_both_index_widths():
    native = c_loops.library()
    if native is None:
        pytest.skip("the C extension was not built (no compiler at install)")
    generator = torch.Generator().manual_seed(11)
    for trial in range(60):
        size = int(torch.randint(1, 70_000, (1,), generator=generator))
        distinct = [1, 3, 50, 10**6][trial % 4]
        keys = torch.randint(0, distinct, (size,), generator=generator).float().numpy()
        for count in {1, size // 3, size // 2, size - 1}:
            if not 0 < count < size:
                continue
            threshold, kept = ranking._select_numpy(keys.copy(), count)
            for wide in (False, True):
                native_threshold, native_kept = ranking._select_native(native, keys.copy(), count, wide=wide)
                assert native_threshold == threshold, (size, distinct, count, wide)
                assert sorted(native_kept.tolist()) == sorted(kept.tolist()), (size, distinct, count, wide)


@pytest.mark.parametrize("fast", [True, False])
def test_keep_largest_gives_the_same_bytes_either_way(monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(ranking, "matches_torch_sort", lambda: False)
    generator = torch.Generator().manual_seed(9)
    delta = (torch.randn(700, 900, generator=generator).bfloat16() - torch.randn(700, 900).bfloat16()).float()
    count = int(0.4 * delta.numel())
    expected = delta * argsort_pick(delta.abs().reshape(-1), count).reshape_as(delta).float()
    kept = keep_largest(delta.clone(), {"density": 0.4}, rescale=False, generator=None)
    assert torch.equal(kept, expected)
    assert torch.equal(kept.signbit(), expected.signbit())  # dropped negatives stay -0.0, as mergekit's

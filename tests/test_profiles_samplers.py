import numpy as np
import pytest
import torch

from longtail.data.profiles import class_counts, draw_unused, hold_out, select_long_tailed
from longtail.data.samplers import InstanceSampler, shard


def test_cifar10_lt_r100_counts():
    counts = class_counts(10, 5000, 100, "exp")
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


@pytest.mark.parametrize(("c", "n_max", "ratio", "total"), [
    (10, 5000, 50, 13996), (10, 5000, 10, 20431),
    (100, 500, 100, 10847), (100, 500, 50, 12608), (100, 500, 10, 19573),
])
def test_cifar_lt_totals_match_spec(c, n_max, ratio, total):
    assert sum(class_counts(c, n_max, ratio, "exp")) == total


def test_cifar100_lt_shot_groups():
    n = np.array(class_counts(100, 500, 100))
    assert ((n > 100).sum(), ((n >= 20) & (n <= 100)).sum(), (n < 20).sum()) == (35, 35, 30)
    assert n[0] == 500 and n[-1] == 5


def test_step_profile():
    assert class_counts(4, 100, 10, "step") == [100, 100, 10, 10]


def test_bad_profile_arguments():
    with pytest.raises(ValueError, match="unknown imbalance profile"):
        class_counts(10, 100, 10, "linear")
    with pytest.raises(ValueError, match=">= 1"):
        class_counts(10, 100, 0.5)


def test_selection_is_cao_compatible():
    # The LDAM-DRW generator: global np.random.seed(seed), then per class shuffle and keep the first n.
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 5, 500)
    counts = [40, 20, 10, 5, 2]
    np.random.seed(7)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(targets == c)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    got = select_long_tailed(targets, counts, 7)
    np.testing.assert_array_equal(got, np.concatenate(expected))
    assert np.bincount(targets[got], minlength=5).tolist() == counts
    assert not np.array_equal(got, select_long_tailed(targets, counts, 8))


def test_selection_asks_for_too_many():
    with pytest.raises(ValueError, match="fewer than"):
        select_long_tailed(np.array([0, 0, 1]), [1, 2], 0)


def test_hold_out_per_class():
    targets = np.repeat(np.arange(3), [50, 10, 2])
    tr, va = hold_out(targets, 0.2, 0)
    assert len(set(tr) & set(va)) == 0 and len(tr) + len(va) == len(targets)
    assert np.bincount(targets[va], minlength=3).tolist() == [10, 2, 1]
    tr2, va2 = hold_out(targets, 0.2, 0)
    np.testing.assert_array_equal(va, va2)


def test_draw_unused_takes_only_what_the_subset_left_out():
    targets = np.repeat(np.arange(3), [20, 20, 20])  # 20 originals per class, grouped as CIFAR's are not
    targets = targets[np.random.RandomState(0).permutation(60)]
    keep = select_long_tailed(targets, [20, 12, 5], 0)  # class 0 keeps all: nothing left for val
    val, got = draw_unused(targets, keep, 6, 3, seed=0)
    assert not set(val) & set(keep) and len(set(val)) == len(val)
    assert got == [0, 6, 6] and np.bincount(targets[val], minlength=3).tolist() == got
    val2, _ = draw_unused(targets, keep, 6, 3, seed=0)
    np.testing.assert_array_equal(val, val2)  # deterministic for a seed
    assert not np.array_equal(draw_unused(targets, keep, 6, 3, seed=1)[0], val)
    big, got_big = draw_unused(targets, keep, 100, 3, seed=0)  # more than exists: all that is left
    assert got_big == [0, 8, 15] and set(big) == set(range(60)) - set(keep)


def test_instance_sampler_is_a_seeded_permutation():
    s = InstanceSampler(torch.arange(10) % 3, 3, seed=1)
    a, b = s.indices(0), s.indices(1)
    assert sorted(a.tolist()) == list(range(10)) and not torch.equal(a, b)
    assert torch.equal(a, InstanceSampler(torch.arange(10) % 3, 3, seed=1).indices(0))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_global_stream(world):
    stream = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shards = [shard(stream, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal length on every rank
    assert set(torch.cat(shards).tolist()) == set(stream.tolist())
    assert sum(len(s) for s in shards) == -(-10 // world) * world


def _freqs(sampler, epoch=0):
    idx = sampler.indices(epoch)
    return torch.bincount(sampler.targets[idx], minlength=sampler.num_classes).double() / len(idx), idx


TARGETS = torch.repeat_interleave(torch.arange(4), torch.tensor([400, 100, 25, 4]))


def test_class_aware_sampler_is_balanced():
    from longtail.data.samplers import ClassAwareSampler

    s = ClassAwareSampler(TARGETS, 4, seed=0)
    f, idx = _freqs(s)
    assert len(idx) == 400 * 4 and torch.allclose(f, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)
    # every sample of the 4-image class is used, each about equally often
    few = torch.bincount(idx[TARGETS[idx] == 3])
    assert few[-4:].tolist() == [100] * 4
    assert torch.equal(idx, ClassAwareSampler(TARGETS, 4, seed=0).indices(0))


def test_class_aware_skips_missing_classes():
    from longtail.data.samplers import ClassAwareSampler

    targets = torch.tensor([0] * 8 + [2] * 8)  # class 1 absent
    idx = ClassAwareSampler(targets, 3, seed=0).indices(0)
    assert len(idx) == 16 and torch.bincount(targets[idx], minlength=3).tolist() == [8, 0, 8]


def test_square_root_frequencies():
    from longtail.data.samplers import SquareRootSampler

    f, _ = _freqs(SquareRootSampler(TARGETS.repeat(20), 4, seed=0))
    expected = torch.tensor([20.0, 10.0, 5.0, 2.0]) / 37
    assert torch.allclose(f, expected.double(), atol=0.01)


def test_progressive_moves_from_instance_to_balanced():
    from longtail.data.samplers import ProgressiveSampler

    s = ProgressiveSampler(TARGETS.repeat(100), 4, seed=0, total_epochs=10)
    f0, _ = _freqs(s, 0)
    inst = torch.tensor([400, 100, 25, 4]).double() / 529
    assert torch.allclose(f0, inst, atol=0.01)
    f5, _ = _freqs(s, 5)
    assert torch.allclose(f5, 0.5 * inst + 0.5 * 0.25, atol=0.01)


@pytest.mark.parametrize("name", ["instance", "class_balanced", "square_root", "progressive"])
def test_sharded_union_equals_single_process_stream(name):
    from longtail.data.samplers import create_sampler

    s = create_sampler(name, TARGETS, 4, seed=3, total_epochs=5)
    stream = s.indices(2)
    shards = [shard(stream, r, 3) for r in range(3)]
    merged = torch.stack([torch.cat([sh, sh.new_full((1,), -1)])[: len(shards[0])] for sh in shards], 1).flatten()
    assert torch.equal(merged[: len(stream)], stream)  # interleaving the shards gives back the global stream

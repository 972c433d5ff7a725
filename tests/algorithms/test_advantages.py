"""Group advantages, overlong shaping and uniform-group detection vs the naive loops (spec 2)."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_ivr.algorithms.advantages import group_advantages, overlong_penalty, uniform_groups
from tests.algorithms import naive


@pytest.mark.parametrize("group_sizes", [[2], [4, 4], [8, 5, 1, 3], [16, 2, 2, 7]])
@pytest.mark.parametrize("by_std", [True, False])
def test_group_advantages_match_naive(group_sizes, by_std):
    rng = random.Random(sum(group_sizes))
    group_ids = [g for g, size in enumerate(group_sizes) for _ in range(size)]
    rng.shuffle(group_ids)  # members of a group need not be adjacent
    rewards = [rng.choice([0.0, 0.1, 0.9, 1.0]) + rng.random() * 0.01 for _ in group_ids]
    got = group_advantages(torch.tensor(rewards), torch.tensor(group_ids), normalize_by_std=by_std)
    expected = naive.advantages(rewards, group_ids, by_std=by_std)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_all_equal_rewards_give_zero_advantage_and_no_nan():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.5])
    got = group_advantages(rewards, torch.tensor([0, 0, 0, 1, 1, 2]))
    assert torch.equal(got, torch.zeros(6))
    assert uniform_groups(rewards, torch.tensor([0, 0, 0, 1, 1, 2])).tolist() == [True] * 6


def test_advantages_use_the_unbiased_std():
    got = group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), eps=0.0)
    assert got.tolist() == pytest.approx([0.5 / (0.5**0.5), -0.5 / (0.5**0.5)])  # std of {1, 0} is sqrt(1/2)


def test_uniform_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3])
    assert uniform_groups(rewards, torch.tensor([0, 0, 1, 1, 2])).tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("max_length, cache", [(100, 20), (64, 64), (10, 1)])
def test_overlong_penalty_matches_naive(max_length, cache):
    lengths = list(range(0, max_length + 10))
    got = overlong_penalty(torch.tensor(lengths), max_length, cache)
    expected = [naive.overlong(n, max_length, cache) for n in lengths]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert got[max_length - cache].item() == 0.0 and got[max_length + 1].item() == -1.0


def test_overlong_penalty_rejects_bad_cache():
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 0)


def test_dynamic_sampling_fills_the_batch_and_is_bounded():
    from megatron_ivr.algorithms.dynamic_sampling import fill_batch, is_informative

    stream = iter([[1, 1], [0, 1], [0, 0], [1, 0], [0.5, 0.5], [0, 1], [1, 0]] + [[1, 1]] * 50)
    asked = []

    def sample(k):
        asked.append(k)
        return [next(stream) for _ in range(k)]

    groups, metrics = fill_batch(sample, lambda g: g, target_groups=4, max_rounds=5)
    assert groups == [[0, 1], [1, 0], [0, 1], [1, 0]]
    assert asked == [4, 2, 1]  # each round asks only for what is missing
    assert metrics == {"dynamic_sampling/rounds": 3, "dynamic_sampling/sampled_groups": 7,
                       "dynamic_sampling/dropped_groups": 3, "dynamic_sampling/short": 0}
    groups, metrics = fill_batch(sample, lambda g: g, target_groups=3, max_rounds=2)
    assert groups == [] and metrics["dynamic_sampling/short"] == 1 and metrics["dynamic_sampling/rounds"] == 2
    assert not is_informative([1.0]) and is_informative([0.0, 0.1])

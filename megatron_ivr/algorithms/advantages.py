"""Group-relative advantages and DAPO's reward-side pieces (spec section 2).

Tensors are per response (``[N]``); a ``group_ids`` tensor says which query each response
answers. Groups may differ in size (IVR-R1 adds up to K rectified responses to a group).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                     normalize_by_std: bool = True) -> torch.Tensor:
    """``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` with the unbiased std.

    A group whose rewards are all equal gets 0 (no NaN); so does a group of one response
    (its unbiased std is undefined). ``normalize_by_std=False`` is Dr.GRPO's variant.
    """
    rewards = rewards.to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    sums = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, rewards)
    means = sums / counts
    centered = rewards - means[inverse]
    if not normalize_by_std:
        return centered.to(torch.float32)
    squares = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, inverse, centered**2)
    var = squares / (counts - 1).clamp_min(1)
    std = var.sqrt()
    advantages = centered / (std[inverse] + eps)
    advantages[counts[inverse] < 2] = 0.0
    return advantages.to(torch.float32)


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache_length: int) -> torch.Tensor:
    """DAPO's soft overlong shaping, added to the reward.

    0 for ``|o| <= L_max - L_cache``; ``((L_max - L_cache) - |o|) / L_cache`` up to ``L_max``;
    -1 beyond.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    lengths = lengths.to(torch.float32)
    soft_start = max_length - cache_length
    penalty = (soft_start - lengths) / cache_length
    penalty = torch.where(lengths <= soft_start, torch.zeros_like(lengths), penalty)
    return torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def uniform_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per response: True when every reward of its group is equal (DAPO drops these groups)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    high = torch.full((num_groups,), -torch.inf, dtype=rewards.dtype).scatter_reduce(0, inverse, rewards, "amax")
    low = torch.full((num_groups,), torch.inf, dtype=rewards.dtype).scatter_reduce(0, inverse, rewards, "amin")
    return (high == low)[inverse]

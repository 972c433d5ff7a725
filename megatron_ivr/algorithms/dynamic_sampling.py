"""DAPO's dynamic sampling (spec section 2): drop groups whose rewards are all equal (they
carry no advantage) and sample more prompts until the batch is full, within a bound."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def is_informative(rewards: Sequence[float]) -> bool:
    """A group teaches something only when its rewards differ."""
    return len(rewards) > 1 and max(rewards) != min(rewards)


def fill_batch(sample_groups: Callable[[int], list[Any]], rewards_of: Callable[[Any], Sequence[float]],
               target_groups: int, max_rounds: int) -> tuple[list[Any], dict]:
    """Call ``sample_groups(k)`` (k more prompts, each returning one scored group) until
    ``target_groups`` informative groups are kept or ``max_rounds`` calls were made.

    Returns the kept groups (at most ``target_groups``) and metrics: rounds used, groups
    sampled and dropped, and whether the batch came out short.
    """
    if target_groups < 1 or max_rounds < 1:
        raise ValueError(f"need target_groups >= 1 and max_rounds >= 1, got {target_groups}, {max_rounds}")
    kept: list[Any] = []
    sampled = dropped = rounds = 0
    while len(kept) < target_groups and rounds < max_rounds:
        rounds += 1
        groups = sample_groups(target_groups - len(kept))
        sampled += len(groups)
        for group in groups:
            if is_informative(rewards_of(group)):
                kept.append(group)
            else:
                dropped += 1
    metrics = {"dynamic_sampling/rounds": rounds, "dynamic_sampling/sampled_groups": sampled,
               "dynamic_sampling/dropped_groups": dropped, "dynamic_sampling/short": int(len(kept) < target_groups)}
    return kept[:target_groups], metrics

"""Rewards of spec section 1: format, accuracy (math-verify in a time-limited pool), composition."""

from megatron_ivr.rewards.accuracy import accuracy_reward, grade_answer
from megatron_ivr.rewards.extract import last_boxed
from megatron_ivr.rewards.format import format_reward
from megatron_ivr.rewards.reward import RewardFunction, RewardResult, combine

__all__ = ["RewardFunction", "RewardResult", "accuracy_reward", "combine", "format_reward",
           "grade_answer", "last_boxed"]

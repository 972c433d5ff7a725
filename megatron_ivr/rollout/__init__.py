"""Rollout engines: the interface, and the backends that implement it."""

from megatron_ivr.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams

__all__ = ["Completion", "GenerationRequest", "RolloutEngine", "SamplingParams"]

"""The rollout engine interface: what the RL loop and the IVR-R1 loop ask of a generator.

Backends (the in-process CPU engine, SGLang servers) implement :class:`RolloutEngine`.
The IVR loop and the trainer depend only on this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, runtime_checkable

from PIL import Image


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """One prompt: the user text (without chat markup) and its images, in order."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    request_id: str = ""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log pi_engine of each generated token
    finish_reason: str  # "stop" | "length" | "abort"
    weight_version: int = 0  # the policy version (trainer step) that produced the tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        """``sampling.n`` completions per request, in request order."""
        ...

    @property
    def weight_version(self) -> int: ...

    def release_memory(self) -> None:
        """Free the engine's accelerator memory while the trainer trains (colocated placement)."""

    def resume_memory(self) -> None:
        """Take it back before the weight sync."""


def reject_stale(groups: list[list[Completion]], current_version: int, max_lag: int
                 ) -> tuple[list[list[Completion]], int]:
    """Drop completions produced by a policy more than ``max_lag`` versions behind the
    trainer (``current_version - weight_version > max_lag``). Returns the kept completions
    per request and how many were rejected (a metric)."""
    kept, rejected = [], 0
    for group in groups:
        fresh = [c for c in group if current_version - c.weight_version <= max_lag]
        rejected += len(group) - len(fresh)
        kept.append(fresh)
    return kept, rejected

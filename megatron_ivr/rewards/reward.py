"""The reward of spec section 1: ``r = lam * r_format + (1 - lam) * r_accuracy``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_ivr.config.schema import RewardConfig
from megatron_ivr.rewards.accuracy import accuracy_reward, load_grader
from megatron_ivr.rewards.format import format_reward
from megatron_ivr.rewards.pool import TimeLimitedPool


@dataclass
class RewardResult:
    total: float
    format: float
    accuracy: float


def combine(format_score: float, accuracy_score: float, lam: float) -> float:
    return lam * format_score + (1.0 - lam) * accuracy_score


def score_response(response: str, gold: str, rel_tol: float, timeout_s: int, template: str) -> tuple[float, float]:
    """``(r_format, r_accuracy)`` of one response: the whole reward's work, run in a pool worker
    so that the time limit bounds all of it (answer extraction and the format check too)."""
    return format_reward(response, template), accuracy_reward(response, gold, rel_tol, timeout_s)


class RewardFunction:
    """Scores batches of responses in a time-limited process pool (format and accuracy: a
    response that overruns ``grader_timeout_s`` scores 0 on both).

    Use as a context manager (or call :meth:`close`) so the workers are shut down.
    """

    def __init__(self, cfg: RewardConfig):
        cfg.validate()
        self.cfg = cfg
        inner_timeout = max(1, int(cfg.grader_timeout_s))
        self._inner_timeout = inner_timeout
        # the outer limit leaves math-verify's own alarm the first chance to fire
        self.pool = TimeLimitedPool(score_response, cfg.num_workers, cfg.grader_timeout_s + 1.0,
                                    default=(0.0, 0.0), warmup=load_grader)

    def __call__(self, responses: Sequence[str], answers: Sequence[str],
                 rel_tols: Sequence[float] | None = None) -> list[RewardResult]:
        """``rel_tols``: per-answer relative tolerance for numbers (default 1e-4; evaluation
        passes a benchmark's stated precision)."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        rel_tols = rel_tols if rel_tols is not None else [1e-4] * len(answers)
        scores = self.pool.map([(r, a, tol, self._inner_timeout, self.cfg.template)
                                for r, a, tol in zip(responses, answers, rel_tols)])
        return [RewardResult(combine(fmt, acc, self.cfg.lam), float(fmt), float(acc)) for fmt, acc in scores]

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

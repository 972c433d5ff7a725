"""Partial rollouts: a generation that a weight push interrupts continues on the new weights.

``rollout.mode=async`` pushes weights while the generator thread generates. The push pauses
the engine in ``abort`` mode (the local engine's ``pause``; SGLang's ``/pause_generation``),
and every in-flight request comes back with the tokens it has so far and finish reason
``abort``. :class:`ContinuingEngine` wraps an engine so that its callers (the rollouts, the
IVR-R1 loop) never see that: it re-submits each aborted response as the ``partial`` of a new
request, which waits for the push to end and then continues it on the new weights. The
result is whole responses whose tokens carry the version that produced each of them
(``Completion.token_versions``), and whose log-probs are each token's under the policy that
sampled it: the behaviour policy the importance weights need (spec section 2).

In sync and one_step_off modes no push meets a generation, nothing is aborted, and the
wrapper returns the engine's results unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from megatron_ivr.rollout.engine import Completion, GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)


class GenerationStopped(RuntimeError):
    """The wrapper was closed while a generation was aborted (the run is ending)."""


class ContinuingEngine:
    """``engine`` with aborted responses continued until they finish (at most
    ``max_continuations`` times each; a response aborted more often keeps finish reason
    ``abort``). ``interrupted`` counts the continuations since the last ``take_counts``."""

    def __init__(self, engine, max_continuations: int = 16):
        self.engine, self.max_continuations = engine, max_continuations
        self.interrupted = 0
        self.stopped = False

    def __getattr__(self, name):  # weight_version, pause, resume, update_weights, ...: the engine's
        return getattr(self.engine, name)

    def take_counts(self) -> dict:
        """Continuations since the last call, and the engine's own counters (``counters()``)."""
        counts, self.interrupted = {"rollout/interrupted": self.interrupted}, 0
        return {**counts, **self.engine.counters()}

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[list[Completion]]:
        if self.stopped:
            raise GenerationStopped("generation stopped")
        results = self.engine.generate(requests, sampling)
        for attempt in range(1, self.max_continuations + 1):
            todo = [(g, k) for g, group in enumerate(results) for k, c in enumerate(group)
                    if c.finish_reason == "abort"]
            if not todo:
                break
            if self.stopped:
                raise GenerationStopped("generation stopped while responses were in flight")
            self.interrupted += len(todo)
            continued = [replace(requests[g], partial=results[g][k], request_id=f"{requests[g].request_id}+{attempt}")
                         for g, k in todo]
            seed = None if sampling.seed is None else sampling.seed + 7919 * attempt  # fresh noise per round
            more = self.engine.generate(continued, replace(sampling, n=1, seed=seed))
            for (g, k), group in zip(todo, more):
                results[g][k] = group[0]
        else:
            aborted = sum(c.finish_reason == "abort" for group in results for c in group)
            if aborted:
                logger.warning("%d response(s) still aborted after %d continuations", aborted, self.max_continuations)
        return results

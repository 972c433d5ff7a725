"""``rollout.mode=async``: a generator thread keeps making experience while the trainer trains
(trainer rank 0; the other ranks get each step's experience by broadcast as in every mode).

    generator thread   draw prompts -> rollouts -> rewards -> [IVR-R1] -> advantages -> a batch
                       (ExperienceMaker.make, one step's worth), queued; at most
                       ``rollout.max_staleness`` batches made or in the making ahead of the trainer
    trainer, step k    take the oldest batch; a group with a token more than max_staleness
                       versions behind the policy that trains (version k - 1) is dropped and its
                       prompt made again -> train -> push version k, which interrupts the
                       generation in flight (partial rollouts: rollout/partial.py)

Why the bound holds without waiting for it: batch j starts once step j - max_staleness has
taken its batch, when the engine serves version >= j - max_staleness - 1, and step j trains
on version j - 1. The staleness check at ``take`` still guards what a bound cannot see (a
restarted server serving its original weights reports version 0).

Off-policy correction: every token carries the engine's log-prob under the version that
sampled it (a partial rollout's tokens, under two or more versions). The clipped ratio is
taken against the trainer's old log-probs (the proximal policy, version k - 1) and the
truncated importance weight (spec section 2, ``algorithm.tis_cap``) against those engine
log-probs: decoupled PPO, as in one_step_off, only with per-token behaviour versions.

A checkpoint after step k holds the sampler's position and, in order, the prompts drawn but
not trained (batches made, the one in the making, prompts dropped for staleness). A resumed
run makes those again first, then draws on: every drawn prompt is trained once and none is
lost, though not with the same tokens (an async run is not reproducible to the token).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional

from megatron_ivr.rollout.partial import GenerationStopped
from megatron_ivr.training.experience import Experience, ExperienceMaker, staleness_metrics

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    experience: Experience
    indices: list[int]  # the sample index of each of its groups, in group order


class AsyncSchedule:
    def __init__(self, maker: ExperienceMaker, total_steps: int, max_staleness: int):
        self.maker, self.total_steps, self.max_staleness = maker, total_steps, max_staleness
        self.engine = maker.engine  # a ContinuingEngine: closing stops its continuations
        self._index_of = {sample.id: i for i, sample in enumerate(maker.samples)}
        self._cond = threading.Condition()
        self._ready: deque[_Batch] = deque()  # made, not taken
        self._making: Optional[list[int]] = None  # drawn for the batch in the making
        self._redo: deque[int] = deque()  # drawn, not trained: made again before the sampler draws on
        self._taken = self._made = 0
        self._stopping = False
        self._error: Optional[BaseException] = None
        self._idle = 0.0  # seconds the generator waited for room (the trainer to take a batch)
        self._thread: Optional[threading.Thread] = None

    # --- the generator thread ------------------------------------------------------------
    def _draw(self, count: int) -> list[int]:
        with self._cond:
            out = [self._redo.popleft() for _ in range(min(count, len(self._redo)))]
            out += self.maker.sampler.draw(count - len(out))
            self._making.extend(out)
            return out

    def _room(self) -> bool:
        ahead = len(self._ready) + (self._making is not None)
        return ahead < self.max_staleness and self._taken + ahead < self.total_steps

    def _generate(self) -> None:
        try:
            while True:
                with self._cond:
                    t0 = time.perf_counter()
                    self._cond.wait_for(lambda: self._stopping or self._room())
                    self._idle += time.perf_counter() - t0
                    if self._stopping:
                        return
                    self._made += 1
                    self._making, number = [], self._made
                experience = self.maker.make(number, self._draw)  # the engine's seeds follow the batch number
                with self._cond:
                    indices = [self._index_of[sample_id] for sample_id in experience.sample_ids]
                    self._ready.append(_Batch(experience, indices))
                    self._making = None
                    self._cond.notify_all()
        except GenerationStopped:
            return
        except BaseException as error:  # re-raised on the trainer's thread
            with self._cond:
                self._error = error
                self._cond.notify_all()

    # --- the trainer's side ---------------------------------------------------------------
    def take(self, step: int) -> Experience:
        """Step ``step``'s experience: the oldest batch made, without the groups that are too stale."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._generate, name="megatron-ivr-async-rollout", daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        dropped = 0
        with self._cond:
            while True:
                self._cond.wait_for(lambda: self._ready or self._error is not None)
                if self._error is not None:
                    raise self._error
                batch = self._ready.popleft()
                experience, stale = keep_fresh(batch.experience, step - 1, self.max_staleness)
                dropped += len(stale)
                self._redo.extendleft(reversed([batch.indices[g] for g in stale]))  # first in line, in order
                if experience.trajectories:
                    break
                self._cond.notify_all()  # room for another batch
            self._taken += 1
            idle, self._idle = self._idle, 0.0
            self._cond.notify_all()
        experience.metrics.update(staleness_metrics(experience, step))
        experience.metrics.update({"rollout/dropped_groups": dropped, "time/wait_for_experience":
                                   time.perf_counter() - t0, "time/engine_idle": idle})
        return experience

    def finish(self, step: int) -> dict:
        return {}  # the push interrupts the generation (bridge/transports.py pauses the engine)

    def close(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.engine.stopped = True
        try:
            self.engine.pause("abort")  # what generates now comes back partial, and is not continued
            self.engine.resume()
        except Exception as error:  # servers gone: the thread's requests fail on their own
            logger.warning("stopping the async generator: the engine did not pause (%s)", error)
        self._thread.join()
        self._thread = None

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampler's position and the prompts drawn but not trained, in the order they were
        to be trained (JSON)."""
        with self._cond:
            pending = [i for batch in self._ready for i in batch.indices] + list(self._making or []) + list(self._redo)
            return {"sampler": self.maker.sampler.state_dict(), "redo": pending, "pending": None}

    def load_state_dict(self, state: dict) -> None:
        self.maker.sampler.load_state_dict(state["sampler"])
        self._redo = deque(state.get("redo") or [])


def keep_fresh(experience: Experience, trainer_version: int, max_staleness: int) -> tuple[Experience, list[int]]:
    """``experience`` without the groups holding a token generated more than ``max_staleness``
    versions before ``trainer_version`` (groups renumbered), and the indices of those dropped."""
    stale = sorted({t.group for t in experience.trajectories
                    if trainer_version - min(t.versions(), default=t.weight_version) > max_staleness})
    if not stale:
        return experience, []
    kept_groups = [g for g in range(len(experience.sample_ids)) if g not in stale]
    renumber = {g: k for k, g in enumerate(kept_groups)}
    trajectories = [replace(t, group=renumber[t.group]) for t in experience.trajectories if t.group in renumber]
    sample_ids = [experience.sample_ids[g] for g in kept_groups]
    return Experience(trajectories, sample_ids, dict(experience.metrics)), stale

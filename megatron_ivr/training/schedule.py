"""When each RL step's experience is made (trainer rank 0): ``rollout.mode``.

    sync          step k: make E_k (the engine serves version k - 1) -> train -> push version k
    one_step_off  step k: take E_k, made during step k - 1 from version max(k - 2, 0);
                  start making E_k+1 on a generator thread (the engine serves version k - 1)
                  -> train on E_k while it generates -> wait for E_k+1 -> push version k

The schedule depends on the step numbers alone, so a one_step_off run is as reproducible
and as layout-invariant as a sync run; the IVR-R1 loop (screen, critique, rectify, verify)
runs inside ``ExperienceMaker.make``, on the generator thread too. The importance weights
correct for the one step of lag: the clipped ratio is taken against the trainer's old
log-probs (the proximal policy, version k - 1), and the truncated importance weight (spec
section 2, ``algorithm.tis_cap``) against the engine's log-probs of the version that generated
each token, the decoupled-PPO reading of spec 2's TIS.

A checkpoint after step k holds E_k+1 (made, not yet trained) and the sampler position after
it, so that a resumed run trains exactly what the uninterrupted run would, and no prompt is
drawn twice or skipped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import fields
from typing import Optional

from megatron_ivr.training.async_schedule import AsyncSchedule
from megatron_ivr.training.experience import Experience, ExperienceMaker, Trajectory, staleness_metrics

MODES = ("sync", "one_step_off")


def make_schedule(maker: ExperienceMaker, mode: str, total_steps: int, max_staleness: int):
    """The schedule of ``rollout.mode``: sync and one_step_off here, async in async_schedule.py."""
    if mode == "async":
        return AsyncSchedule(maker, total_steps, max_staleness)
    return ExperienceSchedule(maker, mode, total_steps)


class ExperienceSchedule:
    def __init__(self, maker: ExperienceMaker, mode: str, total_steps: int):
        if mode not in MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; choose from {MODES}")
        self.maker, self.mode, self.total_steps = maker, mode, total_steps
        self._pending: Optional[tuple[int, Experience]] = None  # (step, its experience), made ahead
        self._thread: Optional[threading.Thread] = None
        self._thread_step = 0  # the step the generator thread is making
        self._result: dict = {}

    def take(self, step: int) -> Experience:
        """Step ``step``'s experience (made ahead, or now); in one_step_off, also starts making
        the next step's on the generator thread."""
        self._join()
        if self._pending is not None and self._pending[0] == step:
            experience = self._pending[1]
        else:
            experience = self.maker.make(step)
        self._pending = None
        experience.metrics.update(staleness_metrics(experience, step))
        if self.mode == "one_step_off" and step < self.total_steps:
            self._start(step + 1)
        return experience

    def finish(self, step: int) -> dict:
        """Before the weight push of ``step``: wait for the next step's generation. Returns the
        overlap: seconds the trainer waited for it, seconds the engine waited for weights."""
        if self._thread is None:
            return {}
        t0 = time.perf_counter()
        self._join()
        waited = time.perf_counter() - t0
        idle = max(0.0, t0 - self._result.get("done_at", t0))
        return {"time/wait_for_experience": waited, "time/engine_idle": idle}

    def _start(self, step: int) -> None:
        self._result = {}

        def generate() -> None:
            try:
                self._result["experience"] = self.maker.make(step)
            except BaseException as error:  # re-raised on the trainer's thread
                self._result["error"] = error
            self._result["done_at"] = time.perf_counter()

        self._thread = threading.Thread(target=generate, name=f"megatron-ivr-rollout-step{step}", daemon=True)
        self._thread.start()
        self._thread_step = step

    def _join(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        if "error" in self._result:
            raise self._result.pop("error")
        self._pending = (self._thread_step, self._result.pop("experience"))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The sampler's position and the experience made ahead (JSON: ids, numbers and text;
        images are the samples', found again by id)."""
        self._join()
        pending = None
        if self._pending is not None:
            step, experience = self._pending
            pending = {"step": step, "sample_ids": experience.sample_ids,
                       "metrics": {k: v for k, v in experience.metrics.items() if isinstance(v, (int, float, str))},
                       "trajectories": [{f.name: getattr(t, f.name) for f in fields(Trajectory) if f.name != "images"}
                                        for t in experience.trajectories]}
        return {"sampler": self.maker.sampler.state_dict(), "pending": pending}

    def load_state_dict(self, state: dict) -> None:
        self.maker.sampler.load_state_dict(state["sampler"])
        pending = state.get("pending")  # absent in checkpoints of sync runs before one_step_off existed
        if pending is None:
            return
        images = {sample.id: sample.images for sample in self.maker.samples}
        trajectories = [Trajectory(**{**row, "images": images[row["sample_id"]]}) for row in pending["trajectories"]]
        self._pending = (pending["step"], Experience(trajectories, pending["sample_ids"], pending["metrics"]))

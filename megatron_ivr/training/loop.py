"""The loop that SFT and RL share: resume, then per step ``job.step`` -> log -> save, with a
clean stop on SIGTERM / SIGINT (Slurm preemption, Ctrl-C).

A *job* (:class:`Job`) knows how to make one step (collective over all trainer ranks) and
what of its own state goes into a checkpoint. The loop owns everything around it: the
checkpointer, the metrics files, the progress display, and the stop signal.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from megatron_ivr.model_providers.checkpoint import Checkpointer

logger = logging.getLogger(__name__)


class Job(Protocol):
    name: str
    total_steps: int

    def start(self, step: int) -> None:
        """Called once before the first step (``step`` = the last completed one, 0 when fresh)."""

    def step(self, step: int) -> dict:
        """One training step (collective); returns this step's metrics (rank 0's are logged)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StopSignal:
    """SIGTERM and SIGINT set a flag; the loop finishes the current step, saves and exits.
    :meth:`requested` agrees across ranks (any rank signalled stops all)."""

    def __init__(self):
        self._flag = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self._flag and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._flag = True
        print(f"\n[signal] {signal.Signals(signum).name}: finishing this step, then saving a checkpoint",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self._flag else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Progress:
    """One line per step on a terminal (rewritten in place). Not on a terminal (a log file, CI),
    plain lines: the first and the last step, and otherwise one step every
    ``plain_interval_s`` seconds, so that a 1,200-step SFT run does not write 1,200 lines."""

    def __init__(self, name: str, total: int, keys: tuple[tuple[str, str], ...], enabled: bool = True,
                 messages: bool = True, plain_interval_s: float = 10.0, clock=time.monotonic):
        """``enabled``: the per-step line; ``messages``: resume, stop and export notices."""
        self.name, self.total, self.keys, self.enabled, self.messages = name, total, keys, enabled, messages
        self.tty = sys.stdout.isatty()
        self.plain_interval_s, self.clock = plain_interval_s, clock
        self._last_plain: Optional[float] = None

    def update(self, step: int, metrics: dict, seconds: float) -> None:
        if not self.enabled:
            return
        parts = [f"{label} {metrics[key]:.3g}" for key, label in self.keys if key in metrics]
        line = f"[{self.name}] step {step}/{self.total} " + " ".join(parts) + f" {seconds:.1f} s/step"
        if self.tty:
            print("\r" + line.ljust(110), end="\n" if step == self.total else "", flush=True)
            return
        now = self.clock()
        if self._last_plain is None or step == self.total or now - self._last_plain >= self.plain_interval_s:
            print(line, flush=True)
            self._last_plain = now

    def message(self, text: str) -> None:
        if self.messages:
            print(("\n" if self.tty else "") + text, flush=True)


def run_job(job: Job, policy, checkpointer: Checkpointer, writer, progress: Progress, save_interval: int,
            resume: bool = True) -> Optional[int]:
    """Run ``job`` from its newest complete checkpoint (or from scratch) to ``total_steps``.
    Returns the last completed step. ``writer`` (rank 0) logs the metrics; None elsewhere."""
    start_step = 0
    newest = checkpointer.newest_verified(progress.message) if resume else None
    if newest is not None:
        step, folder = newest
        t0 = time.perf_counter()
        state = checkpointer.load(folder, policy)
        job.load_state_dict(state["job"])
        start_step = state["step"]
        progress.message(f"[{job.name}] resumed from {folder} (step {start_step}) in {time.perf_counter() - t0:.1f}s")
        if start_step >= job.total_steps:
            progress.message(f"[{job.name}] the newest checkpoint is at step {start_step}, at or past the last step "
                             f"({job.total_steps}): nothing to train (raise the step count, or point the "
                             f"checkpoint dir elsewhere / set checkpoint.resume=false for a new run)")
    job.start(start_step)
    stop = StopSignal()
    step = start_step
    try:
        for step in range(start_step + 1, job.total_steps + 1):
            t0 = time.perf_counter()
            metrics = job.step(step)
            stopping = stop.requested()
            if stopping or step == job.total_steps or (save_interval > 0 and step % save_interval == 0):
                metrics["time/checkpoint"] = checkpointer.save(step, policy, {"job": job.state_dict()})
            metrics["time/step"] = time.perf_counter() - t0
            if writer is not None:
                writer.log(metrics, step=step)
            progress.update(step, metrics, metrics["time/step"])
            if stopping:
                progress.message(f"[{job.name}] stopped by signal after step {step}; checkpoint saved under "
                                 f"{checkpointer.root}; run the same command again to resume")
                break
    finally:
        stop.restore()
    if step >= job.total_steps and dist.get_rank() == 0:
        checkpointer.mark_finished(step)
    dist.barrier()
    return step

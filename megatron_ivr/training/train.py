"""``megatron-ivr sft`` and ``megatron-ivr train`` (RL): the file to read first.

Run alone (one process) or under ``torchrun`` for any TP x PP x DP (gloo on CPU, NCCL on GPU).
Both build their pieces, then hand a job to the shared loop (``loop.run_job``: resume from the
newest verified checkpoint, then per step ``job.step`` -> log -> save; SIGTERM saves and exits)
and write the final policy as a Hugging Face folder. One RL step (``RlJob.step``):

    experience   rank 0: prompts -> engine rollouts -> rewards -> [IVR-R1] -> advantages
                 (experience.py; made at the start of the step, during the step before with
                 rollout.mode=one_step_off: schedule.py, or by a generator thread that runs
                 ahead with rollout.mode=async: async_schedule.py), then to every trainer rank
    train        every rank: log-prob passes, VICRA, the loss, optimizer steps (rl.py)
    sync         the weight bridge pushes the new policy into the engine (bridge/)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from megatron_ivr.bridge.factory import close_rollout, make_rollout
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.metrics import run_writer
from megatron_ivr.model_providers.checkpoint import Checkpointer
from megatron_ivr.model_providers.layout import check_packing
from megatron_ivr.model_providers.output_dir import check_output
from megatron_ivr.model_providers.parallel import trainer_processes
from megatron_ivr.model_providers.policy import export_hf, load_policy
from megatron_ivr.models.processor import check_model_family, load_processor
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.prompts import render_prompt, sample_prompt
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rollout.factory import check_engine_config
from megatron_ivr.training.datasets import read_training_file
from megatron_ivr.training.experience import ExperienceMaker, broadcast_experience
from megatron_ivr.training.loop import Progress, run_job
from megatron_ivr.training.rl import RlStep
from megatron_ivr.training.schedule import make_schedule
from megatron_ivr.training.sft import SftJob, reference_samples

logger = logging.getLogger(__name__)


class RlJob:
    """The RL step as the loop sees it: experience (rank 0), train (every rank), sync."""

    name = "rl"

    def __init__(self, cfg: RunConfig, policy, processor, reference, rank: int):
        self.cfg, self.rank, self.total_steps = cfg, rank, cfg.trainer.steps
        self.train = RlStep(cfg, policy, processor, reference)
        self.schedule = self.reward_fn = dataset = None
        self.data_metrics = {}
        if rank == 0:  # the data first: a bad file stops the run before an engine starts
            dataset = read_training_file(cfg, cfg.data.train_path, cfg.model.path, processor,
                                         lambda s: render_prompt("response", cfg.reward.template, question=s.question))
            self.data_metrics = dataset.metrics("data/train")
        self.engine, self.bridge = make_rollout(cfg, policy, processor, rank)
        if rank == 0:
            self.reward_fn = RewardFunction(cfg.reward)
            maker = ExperienceMaker(cfg, self.engine, self.reward_fn, dataset.samples,
                                    vision_token_ids(processor.tokenizer))
            self.schedule = make_schedule(maker, cfg.rollout.mode, self.total_steps, cfg.rollout.max_staleness)

    def step(self, step: int) -> dict:
        experience = broadcast_experience(self.schedule.take(step) if self.rank == 0 else None)
        metrics = {**experience.metrics, "samples": experience.sample_ids, **(self.data_metrics if step == 1 else {})}
        if not experience.trajectories:  # every response refused (stale, vision tokens) or none came back
            logger.warning("step %d: no usable response (%s): no update this step", step,
                           {k: v for k, v in metrics.items() if k.startswith("rollout/")})
            metrics.update(self._next_experience_ready(step))
            self._set_engine_version(step)  # the weights are unchanged: the engine already serves them
            return {**metrics, "optim/updated": 0.0}
        offload = self.engine is not None and self.cfg.rollout.offload_during_train
        if offload:
            self.engine.release_memory()  # colocated: the GPUs are the trainer's until the sync
        metrics.update(self.train(experience, step))
        if offload:
            self.engine.resume_memory()
        metrics.update(self._next_experience_ready(step))  # one_step_off: the engine is free for the push
        t0 = time.perf_counter()
        report = self.bridge.sync(step)
        self._set_engine_version(step)  # what the engine serves now: samples are checked against it
        metrics.update({"time/weight_sync": time.perf_counter() - t0, **(report.metrics() if report else {}),
                        "throughput/response_tokens": sum(len(t.response_ids) for t in experience.trajectories)})
        return metrics

    def _next_experience_ready(self, step: int) -> dict:
        return self.schedule.finish(step) if self.schedule is not None else {}

    def _set_engine_version(self, step: int) -> None:
        if self.engine is not None:
            self.engine.set_weight_version(step)

    def start(self, step: int) -> None:
        if step > 0:  # resumed: the engine must serve the restored policy
            self.bridge.sync(step)
            self._set_engine_version(step)

    def state_dict(self) -> dict:
        schedule = self.schedule.state_dict() if self.schedule is not None else {"sampler": None}
        return {**schedule, "engine_version": self.engine.weight_version if self.engine else None}

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None:
            self.schedule.load_state_dict(state)

    def close(self) -> None:
        if self.schedule is not None:
            self.schedule.close()
        if self.reward_fn is not None:
            self.reward_fn.close()
        close_rollout(self.bridge, self.rank)


def run_rl(cfg: RunConfig) -> int:
    trainer = cfg.trainer
    check_engine_config(cfg.rollout)  # before minutes of model loading
    check_model_family(cfg.model.family, cfg.model.path)
    if trainer.export_dir:  # a folder we did not write, or one holding the run's own files, is refused now
        check_output(trainer.export_dir, "hf", overwrite=True, sources=[cfg.model.path],
                     protected=[cfg.checkpoint.dir, cfg.logging.dir], key="trainer.export_dir")
    with trainer_processes(cfg, cfg.model.path) as rank:
        check_packing(trainer)
        processor = load_processor(cfg.model.path)
        policy = load_policy(cfg.model.path, cfg.model.dtype, trainer, trainer.steps * trainer.mini_batches,
                             cfg.parallel.fp8, cfg.model.moe_aux_loss_coeff)
        reference = load_policy(cfg.model.path, cfg.model.dtype) if cfg.algorithm.beta > 0 else None
        job = RlJob(cfg, policy, processor, reference, rank)
        writer = run_writer(cfg, cfg.logging.dir, rank)
        progress = Progress("rl", job.total_steps, (("reward/mean", "reward"), ("reward/accuracy", "acc"),
                                                    ("loss/total", "loss")),
                            enabled=rank == 0 and cfg.logging.progress, messages=rank == 0)
        try:
            checkpointer = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last, cfg.model.path)
            last = run_job(job, policy, checkpointer, writer, progress, cfg.checkpoint.save_interval,
                           cfg.checkpoint.resume)
            if last == job.total_steps and trainer.export_dir:
                export_hf(policy, trainer.export_dir, cfg.model.path)
                progress.message(f"[rl] wrote the trained policy to {trainer.export_dir}")
        finally:
            job.close()
            if writer is not None:
                writer.close()
    return 0


def run_sft(cfg: RunConfig) -> int:
    sft = cfg.sft
    out = Path(sft.output_dir)
    check_model_family(cfg.model.family, sft.init_path)
    check_output(str(out / "hf"), "hf", overwrite=True, sources=[sft.init_path],
                 protected=[out / "checkpoints", out / "logs"], key="sft.output_dir")
    with trainer_processes(cfg, sft.init_path) as rank:
        processor = load_processor(sft.init_path)
        datasets = [read_training_file(cfg, path, sft.init_path, processor,
                                       lambda s: sample_prompt(s, cfg.reward.template)) for path in sft.data_paths]
        reference_samples(cfg, datasets)  # before the model loads
        policy = load_policy(sft.init_path, cfg.model.dtype, sft, sft.steps, cfg.parallel.fp8,
                             cfg.model.moe_aux_loss_coeff)
        job = SftJob(cfg, policy, processor, datasets)
        writer = run_writer(cfg, str(out / "logs"), rank)
        progress = Progress("sft", job.total_steps, (("sft/loss", "loss"), ("sft/lr", "lr")),
                            enabled=rank == 0 and cfg.logging.progress, messages=rank == 0)
        try:
            checkpointer = Checkpointer(out / "checkpoints", cfg.checkpoint.keep_last, sft.init_path)
            last = run_job(job, policy, checkpointer, writer, progress, sft.save_interval, cfg.checkpoint.resume)
            if last == job.total_steps:
                export_hf(policy, str(out / "hf"), sft.init_path)
                progress.message(f"[sft] wrote the fine-tuned policy to {out / 'hf'}")
        finally:
            if writer is not None:
                writer.close()
    return 0

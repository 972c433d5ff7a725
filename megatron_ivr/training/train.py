"""Entry points: ``megatron-ivr sft`` and ``megatron-ivr train`` (RL).

Run alone (one process) or under ``torchrun`` for any TP x PP x DP: gloo on CPU, NCCL on
GPU. Both build the same pieces and hand a job to the shared loop (:mod:`.loop`):

    init process groups -> load the policy (HF folder -> Megatron stage) -> job
    -> run_job: resume | per step job.step -> log -> save | SIGTERM: save and exit 0
    -> export the final policy as an HF folder

RL only: rank 0 also holds the rollout engine (the in-process engine on CPU, or a client of
SGLang servers) and the reward pool, and the weight bridge pushes the policy to the engine
after every optimizer step.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ivr.bridge.bridge import WeightBridge
from megatron_ivr.bridge.transports import DistributedTransport, transport_by_name
from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.loader import config_to_dict
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data import ImageRules, read_dataset
from megatron_ivr.metrics import MetricsWriter
from megatron_ivr.model_providers.build import is_stage_leader
from megatron_ivr.model_providers.checkpoint import Checkpointer
from megatron_ivr.model_providers.layout import check_layout
from megatron_ivr.model_providers.lifetime import exit_with_parent, under_torchrun
from megatron_ivr.model_providers.optimizer import OptimizerSettings
from megatron_ivr.model_providers.output_dir import check_output
from megatron_ivr.model_providers.parallel import ParallelLayout, destroy_parallel, init_parallel, select_device
from megatron_ivr.model_providers.policy import ScheduleSettings, export_hf, load_policy
from megatron_ivr.model_providers.qwen_vl import transformer_engine_available
from megatron_ivr.model_providers.state_dict_adapter import detect_key_style
from megatron_ivr.models.processor import MERGE_SIZE, PATCH_SIZE, check_model_family, load_processor, model_family
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.prompts import prompt_length, render_prompt, sample_prompt
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rollout.factory import check_engine_config, make_engine
from megatron_ivr.rollout.sglang.client import SGLangClient
from megatron_ivr.training.experience import ExperienceMaker
from megatron_ivr.training.loop import Progress, run_job
from megatron_ivr.training.rl import RlStep, broadcast_experience
from megatron_ivr.training.sft import SftJob, reference_samples

logger = logging.getLogger(__name__)


@contextmanager
def _parallel(cfg: RunConfig, model_path: str):
    """Threads and process groups (the layout checked against the model first) for the
    body of a job; yields the rank. The groups are torn down however the body ends (a data
    or config error after start-up included)."""
    if under_torchrun():  # a rank ends with its torchrun agent (SIGKILLed, it cannot stop us itself)
        exit_with_parent(os.getppid())
    select_device(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(cfg, world, model_path)
    init_parallel(ParallelLayout(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel), cfg.trainer.seed)
    try:
        yield dist.get_rank()
    finally:
        destroy_parallel()


def _writer(cfg: RunConfig, log_dir: str, rank: int):
    if rank != 0:
        return None
    writer = MetricsWriter(log_dir, cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project
                           if cfg.logging.wandb else None, run_name=cfg.name, config=config_to_dict(cfg))
    return writer


def _read(cfg: RunConfig, path: str, model_path: str, processor, prompt_of):
    """A training file's samples; a prompt (``prompt_of(sample)``, chat template and image tokens
    included) over ``data.max_prompt_tokens`` makes its sample bad: reported, skipped, counted."""
    family = model_family(model_path)
    rules = ImageRules(PATCH_SIZE[family] * MERGE_SIZE, cfg.data.min_pixels, cfg.data.max_pixels,
                       cfg.data.max_source_pixels)

    def prompt_too_long(sample) -> str | None:
        length = prompt_length(processor, prompt_of(sample), [image.size for image in sample.images], rules.factor)
        limit = cfg.data.max_prompt_tokens
        return f"prompt of {length} tokens > data.max_prompt_tokens={limit}" if length > limit else None

    return read_dataset(path, rules, cfg.data.max_bad_fraction, cfg.data.image_root,
                        allow_outside_root=cfg.data.allow_outside_root, check=prompt_too_long)


def _check_export(out_dir: str, key: str, source: str, run_dirs: list) -> None:
    """The export folder, checked before any work: a folder megatron-ivr did not write, or one
    that is, holds or lies inside the model's source, or holds the run's checkpoints or logs, is
    refused (model_providers/output_dir.py); an earlier export of ours is replaced at the end."""
    check_output(out_dir, "hf", overwrite=True, sources=[source], protected=run_dirs, key=key)


def run_sft(cfg: RunConfig) -> int:
    sft = cfg.sft
    out = Path(sft.output_dir)
    check_model_family(cfg.model.family, sft.init_path)
    _check_export(str(out / "hf"), "sft.output_dir", sft.init_path, [out / "checkpoints", out / "logs"])
    with _parallel(cfg, sft.init_path) as rank:
        processor = load_processor(sft.init_path)
        datasets = [_read(cfg, path, sft.init_path, processor, lambda s: sample_prompt(s, cfg.reward.template))
                    for path in sft.data_paths]
        reference_samples(cfg, datasets)  # before the model loads
        policy = load_policy(sft.init_path, cfg.model.dtype,
                             OptimizerSettings(lr=sft.lr, weight_decay=sft.weight_decay, clip_grad=sft.grad_clip),
                             ScheduleSettings(sft.lr_warmup_steps, sft.steps, sft.lr_schedule, sft.min_lr),
                             cfg.parallel.fp8)
        job = SftJob(cfg, policy, processor, datasets)
        writer = _writer(cfg, str(out / "logs"), rank)
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


def _engine(cfg: RunConfig, processor):
    """The rollout engine and its weight transport (rank 0 only)."""
    engine = make_engine(cfg.rollout, cfg.model.path, processor, cfg.trainer.prompts_per_step * cfg.rollout.n)
    if cfg.rollout.backend == "local":
        return engine, transport_by_name("local", engine=engine), engine.parameter_names()
    transport = transport_by_name(cfg.rollout.weight_transport, client=engine.client,
                                  directory=str(Path(cfg.checkpoint.dir) / "weight_sync"),
                                  source_model_dir=cfg.model.path, master_address=cfg.rollout.sync_master_address,
                                  server_tp_size=cfg.rollout.server_tp_size)
    return engine, transport, None


def _per_stage_sync(cfg: RunConfig) -> bool:
    """The ``distributed`` transport under pipeline parallelism sends per stage (bridge.py)."""
    return (cfg.rollout.backend == "sglang" and cfg.rollout.weight_transport == "distributed"
            and cfg.parallel.pipeline_parallel > 1 and cfg.rollout.sync_per_stage)


def _stage_transport(cfg: RunConfig, engine, rank0_transport):
    """Each pipeline stage's leader gets a ``distributed`` transport of its own (group
    ``megatron_ivr_weights_stage{k}``) to the servers rank 0 drives; None on other ranks."""
    import os
    import socket

    holder = [([s.url for s in engine.client.servers], engine.client.api_key) if engine is not None else None]
    dist.broadcast_object_list(holder, src=0)  # the server manager may have picked the ports on rank 0
    urls, api_key = holder[0]
    stage = ps.get_pipeline_model_parallel_rank()
    group_name = f"megatron_ivr_weights_stage{stage}"
    if dist.get_rank() == 0:
        rank0_transport.group_name = group_name
        return rank0_transport
    if not is_stage_leader():
        return None
    local = cfg.rollout.sync_master_address in (None, "127.0.0.1", "localhost")
    address = os.environ.get("IVR_SYNC_ADDRESS") or ("127.0.0.1" if local else
                                                     socket.gethostbyname(socket.gethostname()))
    return DistributedTransport(SGLangClient(urls, api_key=api_key), master_address=address,
                                server_tp_size=cfg.rollout.server_tp_size, group_name=group_name)


def _engine_key_style(names, default: str) -> str:
    """The HF naming the engine serves (the in-process transformers model uses the nested
    names; SGLang loads the checkpoint's own style); decided on rank 0, agreed by all."""
    holder = [detect_key_style(names) if names else default]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class RlJob:
    """The RL step as the loop sees it: experience on rank 0, the trainer step on every rank,
    then the weight sync."""

    name = "rl"

    def __init__(self, cfg: RunConfig, policy, processor, reference, rank: int):
        self.cfg, self.policy, self.rank = cfg, policy, rank
        self.total_steps = cfg.trainer.steps
        self.rl_step = RlStep(cfg, policy, processor, reference)
        self.engine = self.maker = self.reward_fn = None
        transport, names = None, None
        self.data_metrics = {}
        if rank == 0:
            dataset = _read(cfg, cfg.data.train_path, cfg.model.path, processor,
                            lambda s: render_prompt("response", cfg.reward.template, question=s.question))
            self.data_metrics = dataset.metrics("data/train")
            self.engine, transport, names = _engine(cfg, processor)
            self.reward_fn = RewardFunction(cfg.reward)
            self.maker = ExperienceMaker(cfg, self.engine, self.reward_fn, dataset.samples,
                                         vision_token_ids(processor.tokenizer))
        per_stage = _per_stage_sync(cfg)
        if per_stage:
            transport = _stage_transport(cfg, self.engine, transport)
        self.bridge = WeightBridge(policy.model, transport, expected_names=names,
                                   bucket_bytes=cfg.rollout.bucket_mb * 1024**2,
                                   key_style=_engine_key_style(names, policy.key_style), per_stage=per_stage)

    def start(self, step: int) -> None:
        if step > 0:  # resumed: the engine must serve the restored policy
            self.bridge.sync(step)
            if self.engine is not None:
                self.engine.set_weight_version(step)

    def state_dict(self) -> dict:
        return {"sampler": self.maker.sampler.state_dict() if self.maker else None, "engine_version": self.engine
                .weight_version if self.engine else None}

    def load_state_dict(self, state: dict) -> None:
        if self.maker is not None:
            self.maker.sampler.load_state_dict(state["sampler"])

    def step(self, step: int) -> dict:
        import time

        offload = self.engine is not None and self.cfg.rollout.offload_during_train
        experience = broadcast_experience(self.maker.make(step) if self.rank == 0 else None)
        if offload:
            self.engine.release_memory()  # colocated: the GPUs are the trainer's until the sync
        metrics = dict(experience.metrics)
        if not experience.trajectories:  # every response refused (stale, vision tokens) or none came back
            logger.warning("step %d: no usable response (%s): no update this step", step,
                           {k: v for k, v in metrics.items() if k.startswith("rollout/")})
            metrics["optim/updated"] = 0.0
            if offload:
                self.engine.resume_memory()
            if self.engine is not None:
                self.engine.set_weight_version(step)  # the weights are unchanged: the engine already serves them
            return metrics
        metrics.update(self.rl_step(experience, step))
        t0 = time.perf_counter()
        if offload:
            self.engine.resume_memory()
        report = self.bridge.sync(step)
        if self.engine is not None:
            self.engine.set_weight_version(step)  # what the engine serves now: samples are checked against it
        metrics["time/weight_sync"] = time.perf_counter() - t0
        if report is not None:
            metrics.update(report.metrics())
        tokens = sum(len(t.response_ids) for t in experience.trajectories)
        metrics["throughput/response_tokens"] = tokens
        metrics["samples"] = experience.sample_ids
        if step == 1:
            metrics.update(self.data_metrics)
        return metrics

    def close(self) -> None:
        if self.reward_fn is not None:
            self.reward_fn.close()
        transport = self.bridge.transport
        if transport is not None and hasattr(transport, "close"):  # the distributed transport's update
            transport.close()  # group, on the servers and here (a server given by URL outlives the run)
        if self.rank != 0 and transport is not None:  # a stage leader's own client
            transport.client.close()


def _check_packing(cfg: RunConfig) -> None:
    """Shared prompts need an explicit attention mask, which Transformer Engine's fused
    attention does not take; its THD format (``cu_seqlens``) packs single sequences, which is
    what ``trainer.pack_length`` becomes on TE layers (model_providers/batching.py)."""
    if not transformer_engine_available():
        return
    if cfg.trainer.share_prompts:
        raise ConfigError("trainer.share_prompts needs megatron-core's local attention spec (a group's responses "
                          "share one prompt copy through an attention mask, which Transformer Engine's attention "
                          "does not take): set trainer.share_prompts=false; trainer.pack_length > 0 then packs "
                          "sequences in Transformer Engine's THD format", key="trainer.share_prompts")
    if cfg.trainer.packed_format == "mask" and cfg.trainer.pack_length > 0:
        raise ConfigError("trainer.packed_format=mask needs megatron-core's local attention spec; with Transformer "
                          "Engine use auto or thd", key="trainer.packed_format")


def run_rl(cfg: RunConfig) -> int:
    check_engine_config(cfg.rollout)  # before minutes of model loading
    check_model_family(cfg.model.family, cfg.model.path)
    if cfg.trainer.export_dir:
        _check_export(cfg.trainer.export_dir, "trainer.export_dir", cfg.model.path,
                      [cfg.checkpoint.dir, cfg.logging.dir])
    with _parallel(cfg, cfg.model.path) as rank:
        processor = load_processor(cfg.model.path)
        trainer = cfg.trainer
        _check_packing(cfg)
        schedule_steps = trainer.steps * trainer.mini_batches
        policy = load_policy(cfg.model.path, cfg.model.dtype, OptimizerSettings.from_config(trainer),
                             ScheduleSettings(trainer.lr_warmup_steps, schedule_steps, trainer.lr_schedule,
                                              trainer.min_lr), cfg.parallel.fp8)
        reference = load_policy(cfg.model.path, cfg.model.dtype) if cfg.algorithm.beta > 0 else None
        job = RlJob(cfg, policy, processor, reference, rank)
        writer = _writer(cfg, cfg.logging.dir, rank)
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

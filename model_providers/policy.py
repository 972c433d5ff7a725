"""The policy on one trainer rank: its Megatron model stage, loaded from a Hugging Face folder
(converted on load, any TP x PP), wrapped in megatron's DDP with the distributed optimizer
and a learning-rate schedule (megatron's ``OptimizerParamScheduler``: linear warmup, then
constant, linear or cosine decay to ``min_lr``).

A frozen policy (no optimizer) serves as the KL reference when ``algorithm.beta > 0``: a
second model stage with the same layout on the same ranks, loaded from the same folder and
never updated (memory: one more copy of the weights, no optimizer state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ivr.config.schema import OptimizerFields
from megatron_ivr.model_providers.build import DTYPES, build_model, gather_hf_weights, load_hf_weights
from megatron_ivr.model_providers.families import get_provider
from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint, write_hf_folder
from megatron_ivr.model_providers.optimizer import wrap_for_training


@dataclass
class Policy:
    model: object  # this rank's QwenVLModel stage
    hf_config: object
    family: object
    key_style: str
    ddp: object = None  # megatron DDP wrapper (None for a frozen policy)
    optimizer: object = None
    scheduler: object = None

    @property
    def forward_model(self):
        """What the schedules run: the DDP wrapper when trainable."""
        return self.ddp if self.ddp is not None else self.model

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0

    def advance_lr(self) -> None:
        """Set the learning rate of the coming optimizer step (step k uses the schedule at k)."""
        self.scheduler.step(1)


def load_policy(model_path: str, dtype: str = "float32", optim: Optional[OptimizerFields] = None,
                schedule_steps: int = 1, fp8: Optional[str] = None, moe_aux_loss_coeff: float = 0.0) -> Policy:
    """Build this rank's stage and load the HF weights; with ``optim`` (the run's ``trainer`` or
    ``sft`` config), make it trainable, its learning rate scheduled over ``schedule_steps``
    optimizer steps. ``moe_aux_loss_coeff``: the MoE load-balancing loss (``model.moe_aux_loss_coeff``)."""
    checkpoint = HFCheckpoint(model_path)
    hf_config = checkpoint.config()
    model = build_model(hf_config, dtype=DTYPES[dtype], fp8=fp8, moe_aux_loss_coeff=moe_aux_loss_coeff)
    adapter = load_hf_weights(model, checkpoint)
    policy = Policy(model, hf_config, get_provider(hf_config.model_type), adapter.key_style)
    if optim is None:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        return policy
    policy.ddp, policy.optimizer = wrap_for_training(model, optim)
    policy.scheduler = make_scheduler(policy.optimizer, optim, schedule_steps)
    return policy


def make_scheduler(optimizer, optim: OptimizerFields, total_steps: int):
    """megatron's scheduler: ``optim.lr_warmup_steps`` of linear warmup, then ``optim.lr_schedule``
    down to ``optim.min_lr`` at ``total_steps``."""
    warmup = optim.lr_warmup_steps
    for group in optimizer.param_groups:  # megatron's groups carry their own (unset) lr bounds
        group["max_lr"], group["min_lr"] = optim.lr, optim.min_lr
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup > 0 else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=optim.lr_schedule, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")


@torch.no_grad()
def export_hf(policy: Policy, out_dir: str, source_dir: str) -> None:
    """Write the policy as a Hugging Face folder (collective; rank 0 writes, atomically)."""
    tensors = gather_hf_weights(policy.model, policy.key_style)
    if dist.get_rank() == 0:
        write_hf_folder(tensors.items(), out_dir, source_dir)
    dist.barrier()

"""Training wrappers from megatron-core: DDP with contiguous gradient buffers, the
distributed optimizer (optimizer state sharded over data-parallel ranks), and
``finalize_model_grads`` (data-parallel reduction, QK-norm gradients over TP, tied
embeddings across pipeline stages)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_ivr.model_providers.logprobs import forward_logprobs


@dataclass
class OptimizerSettings:
    lr: float = 1e-6
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    distributed_optimizer: bool = True

    @classmethod
    def from_config(cls, trainer) -> OptimizerSettings:
        """From the run's :class:`~megatron_ivr.config.schema.TrainerConfig`."""
        return cls(lr=trainer.lr, weight_decay=trainer.weight_decay, clip_grad=trainer.grad_clip)


def wrap_for_training(model, settings: OptimizerSettings):
    """Wrap one model stage in megatron's DDP and build its optimizer."""
    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=settings.distributed_optimizer))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=settings.lr, weight_decay=settings.weight_decay,
                        clip_grad=settings.clip_grad, adam_beta1=settings.adam_beta1,
                        adam_beta2=settings.adam_beta2, adam_eps=settings.adam_eps,
                        use_distributed_optimizer=settings.distributed_optimizer,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype),
        [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, optimizer


def global_loss_scale(num_micro_batches: int) -> float:
    """The factor that turns a loss already normalized by global (whole-batch) denominators
    into what megatron expects: its schedule divides each micro-batch's loss by the number of
    micro-batches and its DDP averages gradients over data-parallel ranks; multiplying by both
    makes the summed gradient that of the whole batch's objective, however it is split."""
    return float(max(num_micro_batches, 1) * ps.get_data_parallel_world_size())


def train_step(ddp, optimizer, batches, attention_mask_fn, loss_fn=None) -> dict:
    """One optimizer step over ``batches`` (one micro-batch each): forward, backward through
    megatron's schedule, gradient reductions, clipping and the update. Returns the records of
    the loss function, the gradient norm (before clipping) and whether the step was applied."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    records = forward_logprobs(ddp, batches, attention_mask_fn, loss_fn=loss_fn, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    return {"records": records, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "updated": bool(updated)}


def parameter_checksum(model) -> torch.Tensor:
    """Sum of squares of this rank's share of the parameters in float64, TP-replicated ones
    on TP rank 0 only, so that a sum over the TP group covers the model once (to compare
    layouts after a step)."""
    tp_rank = ps.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if getattr(param, "tensor_model_parallel", False) or tp_rank == 0:
            total += param.detach().double().pow(2).sum()
    return total

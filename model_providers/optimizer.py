"""Training wrappers from megatron-core: DDP with contiguous gradient buffers, the
distributed optimizer (optimizer state sharded over data-parallel ranks), and
``finalize_model_grads`` (data-parallel reduction, QK-norm gradients over TP, tied
embeddings across pipeline stages)."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_ivr.config.schema import OptimizerFields
from megatron_ivr.model_providers.logprobs import LossFn, ModelBatch, run_schedule, summed_nll

# Adam's constants (not configurable: the papers' recipes all use them)
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def wrap_for_training(model, optim: OptimizerFields, distributed_optimizer: bool = True):
    """Wrap one model stage in megatron's DDP and build its Adam optimizer from the run's
    optimizer fields (``trainer.*`` for RL, ``sft.*`` for SFT: ``lr``, ``weight_decay``,
    ``grad_clip``)."""
    config = model.config
    ddp = DistributedDataParallel(
        config=config, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=distributed_optimizer))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                        clip_grad=optim.grad_clip, adam_beta1=ADAM_BETAS[0],
                        adam_beta2=ADAM_BETAS[1], adam_eps=ADAM_EPS,
                        use_distributed_optimizer=distributed_optimizer,
                        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype),
        [ddp])
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, optimizer


# the megatron-core versions whose loss normalisation ``global_loss_scale`` undoes (checked by
# tests/model_providers/test_optimizer.py against the installed version's behaviour)
LOSS_NORMALISATION_MATCHES = ">=0.13,<0.17"


def global_loss_scale(num_micro_batches: int, data_parallel_size: int) -> float:
    """The factor that turns a loss already normalized by global (whole-batch) denominators
    into what megatron-core expects, so that the summed gradient is that of the whole batch's
    objective however the batch is split:

    - its schedule divides the loss a loss function returns (as ``(loss, report)``) by the
      number of micro-batches (``schedules.forward_step``: ``output_tensor /= num_microbatches``);
    - its DDP averages gradients over the data-parallel ranks (``gradient_scaling_factor =
      1 / data_parallel_size``).

    Multiplying by both undoes the two averagings (megatron-core ``LOSS_NORMALISATION_MATCHES``).
    """
    return float(max(num_micro_batches, 1) * data_parallel_size)


def train_step(ddp, optimizer, batches: list[ModelBatch], attention_mask_fn,
               loss_fns: Optional[list[LossFn]] = None) -> dict:
    """One optimizer step over ``batches`` (one micro-batch each): forward, backward through
    megatron's schedule, gradient reductions, clipping and the update. ``loss_fns[i](logits)
    -> (loss, report)`` is micro-batch i's loss (default: its summed NLL). Returns the reports
    (on the last pipeline stage; ``[]`` elsewhere), the gradient norm (before clipping) and
    whether the step was applied."""
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss_fns = loss_fns or [summed_nll(batch) for batch in batches]
    reports = run_schedule(ddp, list(zip(batches, loss_fns)), attention_mask_fn, forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    return {"reports": reports, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
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

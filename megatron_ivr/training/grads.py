"""Gradient bookkeeping outside megatron's DDP wrapper: tied-embedding sync across pipeline
stages and the global gradient norm with every parameter counted once."""

from __future__ import annotations

import torch


def finalize_grads(model) -> None:
    """The gradient reductions megatron's ``finalize_model_grads`` does besides data
    parallelism, for a model not wrapped in megatron's DDP:

    - QK-norm weights are replicated over TP but each rank sees only its heads: sum their
      gradients over the TP group;
    - with PP > 1 and tied embeddings, the first stage's embedding and the last stage's output
      layer are copies of one weight: sum their gradients over the embedding group.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() > 1 and model.config.qk_layernorm:
        for name, param in model.named_parameters():
            if param.grad is not None and ("q_layernorm" in name or "k_layernorm" in name):
                dist.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    language = model.language
    if ps.get_pipeline_model_parallel_world_size() == 1 or not language.share_embeddings_and_output_weights:
        return
    if not ps.is_rank_in_embedding_group():
        return
    weight = language.shared_embedding_or_output_weight()
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def grad_norm(model) -> float:
    """L2 norm of all gradients of the model, over the whole model-parallel group; TP-replicated
    parameters count on TP rank 0 only and the last stage's copy of a tied embedding not at all
    (megatron's rules for clipping)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    total = torch.zeros((), dtype=torch.float64)
    for param in model.parameters():
        if param.grad is None:
            continue
        duplicate = not getattr(param, "tensor_model_parallel", False) and tp_rank > 0
        shared_copy = getattr(param, "shared", False)
        if not duplicate and not shared_copy:
            total += param.grad.detach().double().pow(2).sum().cpu()
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return total.sqrt().item()

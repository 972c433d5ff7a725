"""Build one pipeline stage of a Qwen-VL model, load Hugging Face weights into it, and
gather them back out, under any TP x PP layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ivr.model_providers.families import get_provider
from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
from megatron_ivr.model_providers.parallel import device as trainer_device
from megatron_ivr.model_providers.qwen_vl import QwenVLModel, layer_spec
from megatron_ivr.model_providers.state_dict_adapter import (
    ConversionError,
    QwenVLStateDictAdapter,
    detect_key_style,
    expert_index,
    shard,
    to_global_name,
    unshard,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(hf_config, dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                use_transformer_engine: Optional[bool] = None, on_gpu: Optional[bool] = None,
                moe_aux_loss_coeff: float = 0.0) -> QwenVLModel:
    """This rank's stage of the model, for the TP/PP groups already initialized; on the GPU
    when one is available (``on_gpu=False``: built and initialized on the CPU, or on the meta
    device inside ``torch.device("meta")``). ``moe_aux_loss_coeff``: ``qwen_vl.moe_config``."""
    family = get_provider(hf_config.model_type)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    config = family.transformer_config(hf_config, tp=tp, pp=pp, params_dtype=dtype, fp8=fp8,
                                       use_cpu_initialization=not on_gpu,
                                       ep=ps.get_expert_model_parallel_world_size(),
                                       moe_aux_loss_coeff=moe_aux_loss_coeff,
                                       etp=ps.get_expert_tensor_parallel_world_size())
    model = QwenVLModel(family, hf_config, config, layer_spec(config, use_transformer_engine),
                        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    _cast_parameters(model, dtype)
    if on_gpu:
        model.cuda()
    return model


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every floating-point parameter ``dtype``, as megatron's ``Float16Module`` does for
    its training loop. The local spec's norms (``torch.nn.RMSNorm``) ignore ``params_dtype``
    and stay float32; megatron's distributed optimizer then files a mixed-dtype group's main
    parameters in another order than its own index of them, and saving the optimizer state
    fails (or, where shapes happen to agree, stores one parameter's state under another's
    name). Buffers (rotary frequencies) keep their dtype."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_empty_model(hf_config, dtype: torch.dtype = torch.float32) -> QwenVLModel:
    """This rank's stage with its parameters allocated but not initialized: built on the meta
    device (no initialization and none of megatron's CPU-init copies), then given real,
    empty storage. For converters, which fill every parameter from a checkpoint and never
    run the model: buffers (rotary frequencies) are left uninitialized too."""
    with torch.device("meta"):  # megatron's GPU initialization names its device: initialize "on the CPU"
        model = build_model(hf_config, dtype=dtype, on_gpu=False)
    device = trainer_device()
    made: dict[int, torch.nn.Parameter] = {}  # shared (tied) parameters stay shared
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                fresh = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                fresh.__dict__.update(param.__dict__)  # megatron's TP attributes (partition_dim, ...)
                made[id(param)] = fresh
            module._parameters[name] = made[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device=device)
    return model


def adapter_for(model: QwenVLModel, key_style: str = "legacy") -> QwenVLStateDictAdapter:
    return QwenVLStateDictAdapter.from_hf_config(model.hf_config, key_style)


@torch.no_grad()
def load_hf_weights(model: QwenVLModel, checkpoint: HFCheckpoint, progress=None) -> QwenVLStateDictAdapter:
    """Copy this rank's shards of every parameter from the HF checkpoint. Every model
    parameter must be filled; a shape mismatch names the tensor and both shapes.
    ``progress(message)`` is called about every 10% of the tensors."""
    adapter = adapter_for(model, detect_key_style(checkpoint.names()))
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    etp_rank, etp_size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    offset, experts = model.layer_offset(), expert_offset(model)
    params = list(model.named_parameters())
    step = max(1, len(params) // 10)
    for index, (local_name, param) in enumerate(params, start=1):
        name = to_global_name(local_name, offset, experts)
        if progress is not None and (index % step == 0 or index == len(params)):
            progress(f"[convert] {index}/{len(params)} tensors")
        try:
            full = adapter.to_megatron(name, checkpoint.read)
        except KeyError as exc:
            raise ConversionError(f"{name}: missing in {checkpoint.path}: {exc}") from None
        except RuntimeError as exc:  # reshape of a tensor with the wrong size
            raise ConversionError(f"{name}: checkpoint tensors do not fit the model config ({exc})") from None
        rank, size = (etp_rank, etp_size) if expert_index(name) is not None else (tp_rank, tp_size)
        param.copy_(shard(name, full, param, rank, size).to(param.dtype))
    return adapter


def expert_offset(model: QwenVLModel) -> int:
    """The global index of this rank's first expert (expert parallelism; 0 for dense models)."""
    experts = model.config.num_moe_experts or 0
    return ps.get_expert_model_parallel_rank() * (experts // ps.get_expert_model_parallel_world_size())


def takes_part_in_gathers() -> bool:
    """The ranks that hold one whole copy of a stage between them: data-parallel rank 0's TP
    group, and with expert parallelism its expert-parallel peers (the other data-parallel
    ranks of its first expert replica, which hold the other experts)."""
    if ps.get_expert_model_parallel_world_size() > 1:
        return ps.get_expert_data_parallel_rank() == 0
    return ps.get_data_parallel_rank() == 0


@torch.no_grad()
def iter_canonical(model: QwenVLModel) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's full (TP-gathered) tensors under canonical names; TP-collective, and for
    the experts EP-collective: each expert weight comes with its peers' (one per EP rank)."""
    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    # an expert is split over the expert-tensor-parallel group (parallel.expert_tensor_parallel)
    expert_group, expert_size = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_world_size()
    ep_size = ps.get_expert_model_parallel_world_size()
    offset, experts = model.layer_offset(), expert_offset(model)
    local_experts = (model.config.num_moe_experts or 0) // ep_size
    for local_name, param in model.named_parameters():
        name = to_global_name(local_name, offset, experts)
        is_expert = expert_index(name) is not None
        full = unshard(name, param.detach(), param, *((expert_group, expert_size) if is_expert else (group, size)))
        if ep_size == 1 or not is_expert:
            yield name, full
            continue
        parts = [torch.empty_like(full) for _ in range(ep_size)]
        dist.all_gather(parts, full.contiguous(), group=ps.get_expert_model_parallel_group())
        for rank, part in enumerate(parts):
            yield to_global_name(local_name, offset, rank * local_experts), part


@torch.no_grad()
def iter_stage_hf_weights(model: QwenVLModel, key_style: str = "legacy") -> Iterator[tuple[str, torch.Tensor]]:
    """This pipeline stage's weights as HF ``(name, tensor)`` pairs, yielded on the stage's
    leader (TP rank 0 of data-parallel rank 0); the stage's other TP ranks take part in the
    gathers and yield nothing, data-parallel replicas do nothing. Collective within the stage."""
    if not takes_part_in_gathers():
        return
    adapter = adapter_for(model, key_style)
    tp_leader = is_stage_leader()
    for name, full in iter_canonical(model):
        if not tp_leader or (name == "language.output_layer.weight" and adapter.tied_embeddings):
            continue
        yield from adapter.to_hf(name, full)


def is_stage_leader() -> bool:
    """Whether this rank yields its stage's weights in :func:`iter_stage_hf_weights`."""
    return ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0


def iter_hf_weights(model: QwenVLModel, key_style: str = "legacy") -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the whole model's weights as HF ``(name, tensor)`` pairs to global rank 0.

    Works under any TP x PP layout: each pipeline stage in turn all-gathers its TP shards,
    and its leader either yields them (global rank 0) or sends them point to point to
    global rank 0, one tensor at a time behind a small header. Only rank 0 receives pairs;
    every rank must exhaust the iterator (it is collective). Memory: one full tensor at a
    time. Data-parallel replicas (same weights) take no part.
    """
    if not takes_part_in_gathers():
        return
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    root, me = ranks[0], dist.get_rank()
    tp_leader = is_stage_leader()
    my_stage = ps.get_pipeline_model_parallel_rank()
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        if stage == my_stage:
            for hf_name, tensor in iter_stage_hf_weights(model, key_style):
                if me == root:
                    yield hf_name, tensor
                else:
                    dist.send_object_list([(hf_name, tuple(tensor.shape), tensor.dtype)], dst=root)
                    dist.send(tensor.contiguous(), dst=root)
            if tp_leader and me != root:
                dist.send_object_list([None], dst=root)
        elif me == root and tp_leader:
            while True:
                header = [None]
                dist.recv_object_list(header, src=ranks[stage])
                if header[0] is None:
                    break
                hf_name, shape, dtype = header[0]
                # the sender's tensor lives on its device: NCCL carries it when that is a GPU
                tensor = torch.empty(shape, dtype=dtype, device=trainer_device())
                dist.recv(tensor, src=ranks[stage])
                yield hf_name, tensor


@torch.no_grad()
def gather_hf_weights(model: QwenVLModel, key_style: str = "legacy") -> Optional[dict[str, torch.Tensor]]:
    """Every HF tensor of the whole model on global rank 0 (None elsewhere); collective.
    For checkpoints and tests: the weight bridge consumes :func:`iter_hf_weights` as a stream."""
    pairs = {name: tensor.cpu() for name, tensor in iter_hf_weights(model, key_style)}
    return dict(sorted(pairs.items())) if dist.get_rank() == 0 else None

"""Build one pipeline stage of a Qwen-VL model, load Hugging Face weights into it, and
gather them back out, under any TP x PP layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch

from model_providers import get_provider
from model_providers.hf_checkpoint import HFCheckpoint
from model_providers.qwen_vl import QwenVLModel, layer_spec
from model_providers.state_dict_adapter import (
    ConversionError,
    QwenVLStateDictAdapter,
    detect_key_style,
    shard,
    to_global_name,
    unshard,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(hf_config, dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                use_transformer_engine: Optional[bool] = None) -> QwenVLModel:
    """This rank's stage of the model, for the TP/PP groups already initialized."""
    from megatron.core import parallel_state as ps

    family = get_provider(hf_config.model_type)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    config = family.transformer_config(hf_config, tp=tp, pp=pp, params_dtype=dtype, fp8=fp8,
                                       use_cpu_initialization=not torch.cuda.is_available())
    model = QwenVLModel(family, hf_config, config, layer_spec(config, use_transformer_engine),
                        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    if torch.cuda.is_available():
        model.cuda()
    return model


def adapter_for(model: QwenVLModel, key_style: str = "legacy") -> QwenVLStateDictAdapter:
    return QwenVLStateDictAdapter.from_hf_config(model.hf_config, key_style)


@torch.no_grad()
def load_hf_weights(model: QwenVLModel, checkpoint: HFCheckpoint, progress=None) -> QwenVLStateDictAdapter:
    """Copy this rank's shards of every parameter from the HF checkpoint. Every model
    parameter must be filled; a shape mismatch names the tensor and both shapes.
    ``progress(message)`` is called about every 10% of the tensors."""
    from megatron.core import parallel_state as ps

    adapter = adapter_for(model, detect_key_style(checkpoint.names()))
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    offset = model.layer_offset()
    params = list(model.named_parameters())
    step = max(1, len(params) // 10)
    for index, (local_name, param) in enumerate(params, start=1):
        name = to_global_name(local_name, offset)
        if progress is not None and (index % step == 0 or index == len(params)):
            progress(f"[convert] {index}/{len(params)} tensors")
        try:
            full = adapter.to_megatron(name, checkpoint.read)
        except KeyError as exc:
            raise ConversionError(f"{name}: missing in {checkpoint.path}: {exc}") from None
        except RuntimeError as exc:  # reshape of a tensor with the wrong size
            raise ConversionError(f"{name}: checkpoint tensors do not fit the model config ({exc})") from None
        param.copy_(shard(name, full, param, tp_rank, tp_size).to(param.dtype))
    return adapter


@torch.no_grad()
def iter_canonical(model: QwenVLModel) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's full (TP-gathered) tensors under canonical names; TP-collective."""
    from megatron.core import parallel_state as ps

    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    offset = model.layer_offset()
    for local_name, param in model.named_parameters():
        name = to_global_name(local_name, offset)
        yield name, unshard(name, param.detach(), param, group, size)


@torch.no_grad()
def gather_hf_weights(model: QwenVLModel, key_style: str = "legacy") -> Optional[dict[str, torch.Tensor]]:
    """Every HF tensor of the whole model on global rank 0 (None elsewhere); collective over
    the model-parallel group. For checkpoints and tests: the weight bridge streams instead."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    adapter = adapter_for(model, key_style)
    stage = {}
    for name, tensor in iter_canonical(model):
        if name == "language.output_layer.weight" and adapter.tied_embeddings:
            continue
        stage.update(adapter.to_hf(name, tensor.cpu()))
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    group = ps.get_pipeline_model_parallel_group()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # names, shapes and dtypes travel as objects; the tensors themselves point to point
        layouts = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(layouts, [(n, tuple(t.shape), t.dtype) for n, t in stage.items()], group=group)
        ranks = dist.get_process_group_ranks(group)
        if dist.get_rank() == ranks[0]:
            for source, layout in zip(ranks[1:], layouts[1:]):
                for name, shape, dtype in layout:
                    tensor = torch.empty(shape, dtype=dtype)
                    dist.recv(tensor, src=source)
                    stage[name] = tensor
        else:
            for tensor in stage.values():
                dist.send(tensor.contiguous(), dst=ranks[0])
    if dist.get_rank() != 0:
        return None
    return dict(sorted(stage.items()))

"""Stream a Megatron model's weights out as Hugging Face ``(name, tensor)`` pairs.

Works under any TP x PP layout: each pipeline stage in turn all-gathers its TP shards
(canonical names via the model's state-dict adapter), and its TP-rank-0 either yields them
(global rank 0) or sends them point to point to global rank 0, one tensor at a time with a
small header. Only rank 0 receives pairs; every rank must exhaust the iterator (it is
collective). Memory: one full tensor at a time, never the whole model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def iter_hf_weights(model, key_style: str = "legacy") -> Iterator[tuple[str, torch.Tensor]]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from model_providers.build import adapter_for, iter_canonical

    if ps.get_data_parallel_rank() != 0:
        return  # data-parallel replicas hold the same weights
    adapter = adapter_for(model, key_style)
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    root = ranks[0]
    me = dist.get_rank()
    tp_leader = ps.get_tensor_model_parallel_rank() == 0
    my_stage = ps.get_pipeline_model_parallel_rank()
    for stage in range(ps.get_pipeline_model_parallel_world_size()):
        if stage == my_stage:
            for name, full in iter_canonical(model):
                if name == "language.output_layer.weight" and adapter.tied_embeddings:
                    continue
                if not tp_leader:
                    continue
                for hf_name, tensor in adapter.to_hf(name, full):
                    if me == root:
                        yield hf_name, tensor
                    else:
                        dist.send_object_list([(hf_name, tuple(tensor.shape), tensor.dtype)], dst=root)
                        dist.send(tensor.contiguous(), dst=root)
            if tp_leader and me != root:
                dist.send_object_list([None], dst=root)
        elif me == root and tp_leader:
            source = ranks[stage]
            while True:
                header = [None]
                dist.recv_object_list(header, src=source)
                if header[0] is None:
                    break
                hf_name, shape, dtype = header[0]
                tensor = torch.empty(shape, dtype=dtype)
                dist.recv(tensor, src=source)
                yield hf_name, tensor

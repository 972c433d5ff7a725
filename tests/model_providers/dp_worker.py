"""Run under torchrun: one Adam step of the tiny Qwen3-VL with megatron's DDP and distributed
optimizer. The batch is two micro-batches; with data parallelism each DP rank takes one.
Writes the gradient norm and a checksum of the updated weights to OUT. Usage:

    torchrun --nproc_per_node N dp_worker.py OUT TP MODEL_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    out, tp, model_dir = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
    from megatron_ivr.model_providers.batching import build_model_batch
    from megatron_ivr.model_providers.build import build_model, load_hf_weights
    from megatron_ivr.model_providers.families import get_provider
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.model_providers.optimizer import (
        parameter_checksum,
        train_step,
        wrap_for_training,
    )
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.qwen_vl import causal_mask
    from megatron_ivr.models.processor import load_processor
    from tests.model_providers.parity_batch import parity_items

    init_parallel(ParallelismConfig(tensor_parallel=tp))
    from megatron.core import parallel_state as ps

    checkpoint = HFCheckpoint(model_dir)
    hf_config = checkpoint.config()
    model = build_model(hf_config)
    load_hf_weights(model, checkpoint)
    processor = load_processor(model_dir)
    items, _ = parity_items()
    family = get_provider(hf_config.model_type)
    align = model.row_alignment  # sequence parallelism at TP > 1 splits rows evenly
    micro_batches = [build_model_batch(processor, family, hf_config, items[:2], pad_to_multiple=align),
                     build_model_batch(processor, family, hf_config, items[2:], pad_to_multiple=align)]
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = micro_batches[dp_rank::dp_size]
    ddp, optimizer = wrap_for_training(model, TrainerConfig(lr=1e-3, grad_clip=1e9))
    result = train_step(ddp, optimizer, mine, causal_mask)
    checksum = parameter_checksum(model).reshape(1)
    dist.all_reduce(checksum, group=ps.get_tensor_model_parallel_group())  # the whole model on each DP rank
    checksums = [torch.zeros(1, dtype=torch.float64) for _ in range(dp_size)]
    dist.all_gather(checksums, checksum, group=ps.get_data_parallel_group())
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps({"grad_norm": result["grad_norm"], "updated": result["updated"],
                                                      "checksums": [c.item() for c in checksums]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

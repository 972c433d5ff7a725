"""Run under torchrun (any TP x PP): per-token log-probs, entropies, the no-image pass and
one backward pass of the tiny Qwen-VL models, written to OUT for the parent test to
compare against transformers. Usage:

    torchrun --nproc_per_node N parity_worker.py OUT TP PP EP ETP MODEL_DIR [MODEL_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.model_providers.parity_batch import parity_items  # noqa: E402


def main() -> None:
    out, (tp, pp, ep, etp), model_dirs = Path(sys.argv[1]), map(int, sys.argv[2:6]), sys.argv[6:]
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
    from megatron_ivr.model_providers.batching import Packing, build_model_batch
    from megatron_ivr.model_providers.build import build_model, gather_hf_weights, load_hf_weights
    from megatron_ivr.model_providers.families import get_provider
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint, write_hf_folder
    from megatron_ivr.model_providers.logprobs import forward_logprobs
    from megatron_ivr.model_providers.optimizer import train_step, wrap_for_training
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.qwen_vl import causal_mask
    from megatron_ivr.models.processor import load_processor

    init_parallel(ParallelismConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                    expert_tensor_parallel=etp))
    from megatron.core import parallel_state as ps

    rank = dist.get_rank()
    results = {}
    for model_dir in model_dirs:
        checkpoint = HFCheckpoint(model_dir)
        hf_config = checkpoint.config()
        family = get_provider(hf_config.model_type)
        model = build_model(hf_config)
        adapter = load_hf_weights(model, checkpoint)
        processor = load_processor(model_dir)
        with_image, without_image = parity_items()
        align = model.row_alignment  # sequence parallelism at TP > 1 splits rows evenly
        batch = build_model_batch(processor, family, hf_config, with_image, pad_to_multiple=align)
        no_image = build_model_batch(processor, family, hf_config, without_image, pad_to_multiple=align)
        model.eval()
        with torch.no_grad():
            record = forward_logprobs(model, [batch], causal_mask, with_entropy=True)[0]
            record_no_image = forward_logprobs(model, [no_image], causal_mask)[0]
            # THD packing (Transformer Engine's format, through the local spec's attention): every
            # sample, with and without its images, back to back in one row
            both = with_image + without_image
            plain = build_model_batch(processor, family, hf_config, both, pad_to_multiple=align)
            thd = build_model_batch(processor, family, hf_config, both, pad_to_multiple=16,
                                    packing=Packing(pack_length=10_000, thd=True))
            thd_diff = (thd.responses(forward_logprobs(model, [thd], causal_mask)[0]["logprobs"])
                        - plain.responses(forward_logprobs(model, [plain], causal_mask)[0]["logprobs"])).abs().max()
        # before the step changes the weights (in place: copies, not views of the parameters)
        exported = {k: v.clone() for k, v in (gather_hf_weights(model, adapter.key_style) or {}).items()}
        # one step through megatron's DDP and finalize_model_grads (the distributed optimizer's
        # step: test_data_parallel.py); its reduced gradients, every tensor, exported as HF tensors
        ddp, optimizer = wrap_for_training(model, TrainerConfig(lr=1e-4, grad_clip=1e9), distributed_optimizer=False)
        norm = train_step(ddp, optimizer, [batch], causal_mask)["grad_norm"]
        grads = gather_hf_gradients(model, "nested")  # named as transformers' modules are
        # the replicated vision tower must get identical gradients on every TP rank
        vision_spread = 0.0
        if ps.is_pipeline_first_stage() and tp > 1:
            flat = torch.cat([p.main_grad.reshape(-1) for p in model.vision.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(tp)]
            dist.all_gather(gathered, flat, group=ps.get_tensor_model_parallel_group())
            vision_spread = max((g - gathered[0]).abs().max().item() for g in gathered)
        if rank == 0:
            name = hf_config.model_type
            torch.save({"logprobs": record["logprobs"].cpu(), "entropy": record["entropy"].cpu(),
                        "logprobs_no_image": record_no_image["logprobs"].cpu()}, out / f"{name}.pt")
            write_hf_folder(exported.items(), out / f"{name}_export", model_dir)
            torch.save({key: value.cpu() for key, value in grads.items()}, out / f"{name}_grads.pt")
            results[name] = {"grad_norm": norm, "thd_max_diff": thd_diff.item()}
        spread = torch.tensor([vision_spread])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if rank == 0:
            results[hf_config.model_type]["vision_grad_spread"] = spread.item()
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def gather_hf_gradients(model, key_style: str) -> dict:
    """Each parameter's reduced gradient (``main_grad``) under its HF name on rank 0: the
    weights' own gather (TP shards, experts over EP, stages), run on the gradients."""
    from megatron_ivr.model_providers.build import gather_hf_weights

    weights = {param: param.data for param in model.parameters()}
    for param in weights:
        param.data = param.main_grad.to(param.dtype)
    try:
        return gather_hf_weights(model, key_style)
    finally:
        for param, data in weights.items():
            param.data = data


if __name__ == "__main__":
    main()

"""Run under torchrun (TP=2 by default): load the HF checkpoint into Megatron, change both
the language and the vision weights, push them into a running SGLang server through the
weight bridge, and save the same weights as an HF folder (the transformers reference).
TRANSPORT ``distributed_per_stage`` gives each pipeline stage's leader its own broadcast
group (the bridge's ``per_stage``). Usage:

    torchrun --nproc_per_node N push_worker.py MODEL_DIR SERVER_URL OUT_DIR TRANSPORT VERSION [TP PP]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    model_dir, url, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    transport_name, version = sys.argv[4], int(sys.argv[5])
    tp, pp = (int(sys.argv[6]), int(sys.argv[7])) if len(sys.argv) > 7 else (2, 1)
    per_stage = transport_name == "distributed_per_stage"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ivr.bridge.bridge import WeightBridge
    from megatron_ivr.bridge.transports import DistributedTransport, transport_by_name
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.build import build_model, gather_hf_weights, is_stage_leader, load_hf_weights
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint, write_hf_folder
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.state_dict_adapter import detect_key_style
    from megatron_ivr.rollout.sglang.client import SGLangClient

    init_parallel(ParallelismConfig(tensor_parallel=tp, pipeline_parallel=pp))
    checkpoint = HFCheckpoint(model_dir)
    key_style = detect_key_style(checkpoint.names())
    model = build_model(checkpoint.config())
    load_hf_weights(model, checkpoint)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(version)
        for param in model.parameters():  # vision and language both change
            noise = torch.randn(param.shape, generator=generator) * 0.05 * param.abs().mean().clamp_min(1e-3)
            param.add_(noise)
    reference = gather_hf_weights(model, key_style)
    client = SGLangClient([url]) if dist.get_rank() == 0 else None
    if per_stage:
        group = f"megatron_ivr_weights_stage{ps.get_pipeline_model_parallel_rank()}"
        transport = DistributedTransport(client or SGLangClient([url]), group_name=group) if is_stage_leader() else None
    else:
        transport = transport_by_name(transport_name, client=client) if client else None
    from megatron_ivr.bridge.verify import LogprobProbe
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.rollout.sglang.engine import SGLangEngine

    processor = load_processor(model_dir)
    engine = SGLangEngine(client, processor.tokenizer) if client else None
    probe = LogprobProbe(model, processor, engine, tolerance=1e-4)
    bridge = WeightBridge(model, transport, expected_names=checkpoint.names() if client else None,
                          bucket_bytes=256 * 1024, key_style=key_style, verify=probe, per_stage=per_stage)
    report = bridge.sync(version=version)
    if dist.get_rank() == 0:
        write_hf_folder(reference.items(), out / "pushed", model_dir)
        (out / "report.json").write_text(json.dumps({**report.metrics(), "probe_max_diff": probe.last_max_diff}))
    dist.barrier()
    if transport is not None and hasattr(transport, "close"):
        transport.close()
    if transport is not None and transport.client is not client:  # a stage leader's own client
        transport.client.close()
    if client is not None:
        client.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

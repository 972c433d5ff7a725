"""Run under torchrun with TP=2: load the HF checkpoint into Megatron, change both the
language and the vision weights, push them into a running SGLang server through the weight
bridge (tensor transport, version 7), and save the same weights as an HF folder (the
transformers reference). Usage:

    torchrun --nproc_per_node 2 push_worker.py MODEL_DIR SERVER_URL OUT_DIR TRANSPORT VERSION
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
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_ivr.bridge.bridge import WeightBridge
    from megatron_ivr.bridge.transports import transport_by_name
    from megatron_ivr.rollout.sglang.client import SGLangClient
    from megatron_ivr.training.parallel import ParallelLayout, init_parallel
    from model_providers.build import build_model, gather_hf_weights, load_hf_weights
    from model_providers.hf_checkpoint import HFCheckpoint, write_hf_folder
    from model_providers.state_dict_adapter import detect_key_style

    init_parallel(ParallelLayout(2, 1))
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
    transport = transport_by_name(transport_name, client=client) if client else None
    from megatron_ivr.bridge.verify import LogprobProbe
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.rollout.sglang.engine import SGLangEngine

    processor = load_processor(model_dir)
    engine = SGLangEngine(client, processor.tokenizer) if client else None
    probe = LogprobProbe(model, processor, engine, tolerance=1e-4)
    bridge = WeightBridge(model, transport, expected_names=checkpoint.names() if client else None,
                          bucket_bytes=256 * 1024, key_style=key_style, verify=probe)
    report = bridge.sync(version=version)
    if dist.get_rank() == 0:
        write_hf_folder(reference.items(), out / "pushed", model_dir)
        (out / "report.json").write_text(json.dumps({**report.metrics(), "probe_max_diff": probe.last_max_diff}))
        if hasattr(transport, "close"):
            transport.close()
        client.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun (any TP x PP): change the Megatron weights (a stand-in for an
optimizer step), then sync them with the weight bridge into an in-process engine on rank 0.
Checks, written to OUT/results.json by rank 0:
- every bucketed tensor is bit-identical to the converter's HF export of the same weights;
- the engine's parameters equal those tensors afterwards, and its version is the step.
With ``per_stage``, each pipeline stage's leader sends its own layers through its own
(recording) transport; the union of what the stages sent is checked instead of the engine.
Usage: torchrun --nproc_per_node N bridge_worker.py OUT TP PP MODEL_DIR [per_stage]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    out, tp, pp, model_dir = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    per_stage = sys.argv[5:] == ["per_stage"]
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_ivr.bridge.bridge import WeightBridge
    from megatron_ivr.bridge.buckets import unflatten
    from megatron_ivr.bridge.transports import LocalTransport
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.build import build_model, gather_hf_weights, is_stage_leader, load_hf_weights
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.rollout.local import LocalEngine

    init_parallel(ParallelismConfig(tensor_parallel=tp, pipeline_parallel=pp))
    checkpoint = HFCheckpoint(model_dir)
    model = build_model(checkpoint.config())
    load_hf_weights(model, checkpoint)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            param.mul_(1.0 + 0.01 * ((index % 7) + 1))  # a new policy, different per tensor
    reference = gather_hf_weights(model, "nested")  # the converter's export of the same weights

    class Recording(LocalTransport):
        def __init__(self, engine):
            super().__init__(engine)
            self.sent, self.bucket_sizes = {}, []

        def send(self, bucket):
            self.bucket_sizes.append(bucket.nbytes)
            self.sent.update({n: t.clone() for n, t in unflatten(bucket)})
            if not per_stage:
                super().send(bucket)

    engine = LocalEngine.from_pretrained(model_dir) if dist.get_rank() == 0 else None
    transport = Recording(engine) if engine is not None or (per_stage and is_stage_leader()) else None
    names = engine.parameter_names() if engine is not None else None
    bridge = WeightBridge(model, transport, expected_names=names, bucket_bytes=64 * 1024, key_style="nested",
                          per_stage=per_stage)
    report = bridge.sync(version=5)
    if per_stage:
        if transport is not None:
            torch.save(transport.sent, out / f"sent_rank{dist.get_rank()}.pt")
        dist.barrier()
        if dist.get_rank() == 0:
            parts = [torch.load(f, weights_only=True) for f in sorted(out.glob("sent_rank*.pt"))]
            sent = {n: t for part in parts for n, t in part.items()}
            results = {"senders": len(parts), "disjoint": sum(len(p) for p in parts) == len(sent),
                       "same_names": sorted(sent) == sorted(reference),
                       "bit_identical": all(torch.equal(sent[n], reference[n]) for n in reference),
                       "engine_version": engine.weight_version, "tensors": report.tensors,
                       "expected_tensors": len(reference),
                       "buckets": report.buckets, "bytes": report.bytes}
            (out / "results.json").write_text(json.dumps(results))
        dist.barrier()
        dist.destroy_process_group()
        return
    if dist.get_rank() == 0:
        params = dict(engine.model.named_parameters())
        results = {
            "same_names": sorted(transport.sent) == sorted(reference),
            "bit_identical": all(torch.equal(transport.sent[n], reference[n]) for n in reference),
            "engine_updated": all(torch.equal(params[n].detach(), reference[n]) for n in reference),
            "engine_version": engine.weight_version,
            "buckets": report.buckets, "max_bucket": max(transport.bucket_sizes), "bytes": report.bytes,
            "tensors": report.tensors,
        }
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Weight-bridge throughput (gather + convert + pack) against a plain ``torch.cat`` copy of
the same bytes, in the same run.

Model: the random 208M-parameter Qwen2.5-VL of benchmarks/convert.py, loaded into
Megatron-Core at TP1 (one process). The bridge arm streams HF-named tensors out of the
Megatron shards (QKV and gate/up split back to HF layout) and packs them into flattened
512 MiB buckets; the transport is left out (what is measured is the trainer side). The
baseline concatenates the very same tensors into buckets of the same size.

Usage: python benchmarks/weight_sync.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convert import make_model  # noqa: E402

BUCKET = 512 * 1024**2


def plain_copy(tensors: list[torch.Tensor]) -> int:
    total, pending, size = 0, [], 0
    for tensor in tensors:
        raw = tensor.reshape(-1).view(torch.uint8)
        if pending and size + raw.numel() > BUCKET:
            total += torch.cat(pending).numel()
            pending, size = [], 0
        pending.append(raw)
        size += raw.numel()
    if pending:
        total += torch.cat(pending).numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from megatron_ivr.bridge.buckets import bucketize
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.build import build_model, iter_hf_weights, load_hf_weights
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig())
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        make_model(Path(tmp) / "m", 8, 1024)
        checkpoint = HFCheckpoint(Path(tmp) / "m")
        model = build_model(checkpoint.config())
        load_hf_weights(model, checkpoint)
    same_tensors = [t for _, t in iter_hf_weights(model)]  # the bytes the baseline copies
    nbytes = sum(t.numel() * t.element_size() for t in same_tensors)
    bridge_times, copy_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sent = sum(bucket.nbytes for bucket in bucketize(iter_hf_weights(model), BUCKET))
        bridge_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        copied = plain_copy(same_tensors)
        copy_times.append(time.perf_counter() - start)
        assert sent == copied == nbytes
    destroy_parallel()
    bridge, copy = statistics.median(bridge_times), statistics.median(copy_times)
    print(f"{nbytes / 1e9:.2f} GB in {len(same_tensors)} tensors, 512 MiB buckets, TP1, {args.repeats} repeats")
    print(f"plain torch.cat copy: {copy:.2f} s = {nbytes / copy / 1e9:.2f} GB/s")
    print(f"bridge (gather + convert + pack): {bridge:.2f} s = {nbytes / bridge / 1e9:.2f} GB/s")
    print(f"weight_sync: ratio={copy / bridge:.2f} (bridge bytes/s over plain torch.cat copy bytes/s; goal >= 0.8)")


if __name__ == "__main__":
    main()

"""Weight sync at two pipeline stages: every stage through trainer rank 0 (the funnel) against
each stage's leader packing and sending its own layers (per stage), in the same run.

Model: the random 208M-parameter Qwen2.5-VL of benchmarks/convert.py at PP2 (two processes,
gloo, one thread each). Both arms run ``WeightBridge.sync`` with a transport that receives
the packed 512 MiB buckets and drops them, so what is timed is the trainer side: the TP/PP
gathers, the HF conversion, the packing, and in the funnel the point-to-point hop of the
second stage's tensors to rank 0. (A real server then receives the same bytes either way;
docs/rollout.md has the arithmetic for that part.)

Usage: python benchmarks/weight_sync_stages.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = 512 * 1024**2


class DroppingTransport:
    """Takes the buckets and keeps nothing (the trainer side is what is measured)."""

    name = "drop"

    def __init__(self):
        self.bytes = 0

    def prepare(self) -> None:
        pass

    def begin(self, version: int) -> None:
        pass

    def send(self, bucket) -> None:
        self.bytes += bucket.nbytes

    def finish(self, version: int) -> None:
        pass


def worker(rank: int, world: int, port: int, model_dir: str, repeats: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_ivr.bridge.bridge import WeightBridge
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.build import build_model, is_stage_leader, load_hf_weights
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig(pipeline_parallel=world))
    checkpoint = HFCheckpoint(model_dir)
    model = build_model(checkpoint.config())
    load_hf_weights(model, checkpoint)
    times = {}
    for arm, per_stage in (("funnel", False), ("per_stage", True)):
        transport = DroppingTransport() if rank == 0 or (per_stage and is_stage_leader()) else None
        bridge = WeightBridge(model, transport, bucket_bytes=BUCKET, per_stage=per_stage)
        seconds = []
        for version in range(repeats + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            bridge.sync(version)
            dist.barrier()
            seconds.append(time.perf_counter() - start)
        times[arm] = statistics.median(seconds[1:])
        sent = torch.tensor([float(transport.bytes) if transport else 0.0])
        dist.all_reduce(sent)
        times[arm + "_bytes"] = sent.item() / (repeats + 1)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from benchmarks.convert import make_model
    from megatron_ivr.model_providers.parallel import free_port

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        make_model(Path(tmp) / "m", 8, 1024)
        out = Path(tmp) / "times.txt"
        torch.multiprocessing.start_processes(worker, args=(2, free_port(), str(Path(tmp) / "m"), args.repeats,
                                                            str(out)), nprocs=2, start_method="spawn", join=True)
        times = json.loads(out.read_text())
    gb = times["funnel_bytes"] / 1e9
    print(f"{gb:.2f} GB per sync at PP2 (2 processes, gloo, 1 thread each), 512 MiB buckets, median of "
          f"{args.repeats} after a warm-up")
    for arm in ("funnel", "per_stage"):
        print(f"{arm}: {times[arm]:.2f} s = {gb / times[arm]:.2f} GB/s (sent {times[arm + '_bytes'] / 1e9:.2f} GB)")
    print(f"weight_sync_stages: ratio={times['funnel'] / times['per_stage']:.2f} "
          "(funnel s/sync over per-stage s/sync, PP2)")


if __name__ == "__main__":
    main()

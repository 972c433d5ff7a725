"""Checkpoint converters between Hugging Face folders and megatron-core distributed checkpoints.

- ``hf_to_megatron``: ``tp * pp`` processes (gloo on CPU, NCCL on GPU) each build their
  stage, read only their own slices of the HF tensors, and save collectively with
  ``dist_checkpointing`` (``torch_dist`` backend) with ``writers`` writer processes per rank
  (megatron's default is 2; on this CPU machine 4 wrote the 0.8 GB checkpoint of
  ``benchmarks/convert.py`` in a median 1.62 s against 1.83 s over six alternating runs: the
  writes wait on the page cache and fsync, not on the CPU). The checkpoint loads at any other
  TP/PP (megatron reshards on load).
- ``megatron_to_hf``: load a distributed checkpoint at any layout, gather TP shards and PP
  stages to rank 0, write safetensors shards + index + config, tokenizer and processor.

Both check every argument and the output folder before anything is touched, write into a
fresh staging folder and publish it at the end (``output_dir.py``: an interrupted conversion
leaves no half-written checkpoint under the final name; an existing OUT is replaced only
when it is an earlier output of the same kind and ``overwrite`` is set; OUT equal to, inside
or above SRC is refused). ``megatron_ivr.json`` in the Megatron
folder records the family, layout, dtype and HF key style; ``hf/`` keeps the HF config,
tokenizer and processor files and the carried tensors (``carried.safetensors``: Qwen3.5's
multi-token-prediction heads, which the Megatron model does not hold) so an export needs
nothing else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.schema import ParallelismConfig
from megatron_ivr.model_providers.build import DTYPES, build_empty_model, gather_hf_weights, load_hf_weights
from megatron_ivr.model_providers.hf_checkpoint import (
    SIDE_FILES,
    HFCheckpoint,
    save_carried_tensors,
    write_hf_folder,
)
from megatron_ivr.model_providers.lifetime import exit_with_parent
from megatron_ivr.model_providers.manifest import CheckpointRefused, require_verified, write_manifest
from megatron_ivr.model_providers.output_dir import check_output, discard, publish, staging_dir
from megatron_ivr.model_providers.parallel import destroy_parallel, free_port, init_parallel

META_NAME = "megatron_ivr.json"


def _worker(rank: int, world: int, port: int, job: str, args: dict, parent: int | None = None) -> None:
    if parent is not None:  # a spawned rank ends with the converter that started it
        exit_with_parent(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if job == "hf_to_megatron":
        _hf_to_megatron_rank(**args)
    else:
        _megatron_to_hf_rank(**args)


def _launch(job: str, world: int, args: dict) -> None:
    """Run ``job`` on ``world`` ranks: in this process when world == 1, else spawned."""
    if world == 1 and not torch.distributed.is_initialized():
        _worker(0, 1, free_port(), job, args)
        _teardown()
        return
    torch.multiprocessing.start_processes(_worker, args=(world, free_port(), job, args, os.getpid()), nprocs=world,
                                          start_method="spawn", join=True)


def _teardown() -> None:
    destroy_parallel()


def _log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def processes(tp: int, pp: int, ep: int = 1, etp: int = 1) -> int:
    """The fewest processes that hold the layout: whole TP x PP replicas whose stages split
    into EP x expert-TP groups."""
    return pp * math.lcm(tp, ep * etp)


def _hf_to_megatron_rank(hf_dir: str, tmp_dir: str, tp: int, pp: int, dtype: str, writers: int, ep: int = 1,
                         etp: int = 1) -> None:
    init_parallel(ParallelismConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                    expert_tensor_parallel=etp))
    checkpoint = HFCheckpoint(hf_dir)
    start = time.time()
    model = build_empty_model(checkpoint.config(), dtype=DTYPES[dtype])  # every parameter is loaded below
    total = sum(1 for _ in model.parameters())
    _log(f"[convert] built stage models (tp={tp}, pp={pp}, ep={ep}, etp={etp}); loading {total} tensors on rank "
         "0's stage")
    adapter = load_hf_weights(model, checkpoint, progress=_log)
    _log(f"[convert] loaded in {time.time() - start:.1f}s; saving the distributed checkpoint")
    dist_checkpointing.save(model.sharded_state_dict(), tmp_dir,
                            sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writers))
    if dist.get_rank() == 0:
        meta = {"family": model.family.name, "tp": tp, "pp": pp, "ep": ep, "etp": etp, "dtype": dtype,
                "key_style": adapter.key_style, "source": str(hf_dir)}
        (Path(tmp_dir) / META_NAME).write_text(json.dumps(meta, indent=2))
    dist.barrier()


def _megatron_to_hf_rank(ckpt_dir: str, out_dir: str, tp: int, pp: int, max_shard_bytes: int,
                         overwrite: bool, ep: int = 1, etp: int = 1) -> None:
    from transformers import AutoConfig

    init_parallel(ParallelismConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                    expert_tensor_parallel=etp))
    meta = json.loads((Path(ckpt_dir) / META_NAME).read_text())
    hf_config = AutoConfig.from_pretrained(str(Path(ckpt_dir) / "hf"))
    model = build_empty_model(hf_config, dtype=DTYPES[meta["dtype"]])  # filled by the strict load below
    _log(f"[convert] loading {ckpt_dir} at tp={tp}, pp={pp}, ep={ep}, etp={etp}")
    sharded = model.sharded_state_dict()
    state = dist_checkpointing.load(sharded, ckpt_dir)
    # a trainer checkpoint also holds the optimizer: its common (non-tensor) part comes back
    # with any load; only the model's entries go into the model, and those strictly
    model.load_state_dict({key: value for key, value in state.items() if key in sharded}, strict=True)
    exported = gather_hf_weights(model, meta["key_style"])
    if dist.get_rank() == 0:
        _log(f"[convert] writing {len(exported)} tensors")
        write_hf_folder(exported.items(), out_dir, Path(ckpt_dir) / "hf", max_shard_bytes, overwrite=overwrite)
    dist.barrier()


def check_arguments(tp: int, pp: int, dtype: str = "float32", writers: int = 1, ep: int = 1, etp: int = 1) -> None:
    """Range checks of the converter's arguments (before anything is read or written)."""
    for name, value in (("--tp", tp), ("--pp", pp), ("--ep", ep), ("--etp", etp), ("--writers", writers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}", key=name)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", key="--dtype")


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1, dtype: str = "float32",
                   writers: int = 4, overwrite: bool = False, ep: int = 1, etp: int = 1) -> Path:
    """``ep`` / ``etp``: expert-parallel and expert-tensor-parallel sizes (mixture-of-experts
    models); :func:`processes` processes."""
    check_arguments(tp, pp, dtype, writers, ep, etp)
    hf_dir = Path(hf_dir)
    HFCheckpoint(hf_dir)  # SRC is an HF folder (FileNotFoundError names what is missing)
    out_dir = check_output(out_dir, "megatron", overwrite=overwrite, sources=[hf_dir])
    tmp = staging_dir(out_dir)
    try:
        _launch("hf_to_megatron", processes(tp, pp, ep, etp),
                dict(hf_dir=str(hf_dir), tmp_dir=str(tmp), tp=tp, pp=pp, dtype=dtype, writers=writers, ep=ep,
                     etp=etp))
        (tmp / "hf").mkdir()
        for name in SIDE_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / "hf" / name)
        save_carried_tensors(hf_dir, tmp / "hf")  # Qwen3.5's multi-token-prediction heads
        write_manifest(tmp)  # last: what a load checks before unpickling anything
    except BaseException:
        discard(tmp)
        raise
    return publish(tmp, out_dir, "megatron", overwrite=overwrite)


def megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                   max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, ep: int = 1, etp: int = 1) -> Path:
    check_arguments(tp, pp, ep=ep, etp=etp)
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / META_NAME).is_file():
        raise CheckpointRefused(f"{ckpt_dir}: not a megatron-ivr checkpoint (no {META_NAME}): nothing was loaded")
    require_verified(ckpt_dir)  # before megatron-core unpickles anything in it
    out_dir = check_output(out_dir, "hf", overwrite=overwrite, sources=[ckpt_dir])
    _launch("megatron_to_hf", processes(tp, pp, ep, etp),
            dict(ckpt_dir=str(ckpt_dir), out_dir=str(out_dir), tp=tp, pp=pp, max_shard_bytes=max_shard_bytes,
                 overwrite=overwrite, ep=ep, etp=etp))
    return out_dir

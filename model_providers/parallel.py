"""Process groups for the trainer: torch.distributed + megatron-core's model parallelism.

Works under ``torchrun`` (reads RANK/WORLD_SIZE/MASTER_ADDR from the environment) and in a
single plain process (world size 1 on a free loopback port). Backend: gloo on CPU, where the
CPU platform patches are applied first; with CUDA, one group with two backends: NCCL for
CUDA tensors (gradients, weights) and gloo for CPU tensors (control flags, metric sums,
headers), so that small host-side collectives need no device copy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_ivr.config import ConfigError
from megatron_ivr.config.schema import ParallelismConfig, RunConfig
from megatron_ivr.model_providers.layout import check_layout
from megatron_ivr.model_providers.lifetime import exit_with_parent, under_torchrun
from megatron_ivr.model_providers.platform import apply_cpu_patches


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def select_device(choice: str) -> None:
    """``trainer.device``: ``cpu`` hides every GPU from this process (before CUDA is first
    touched, so that every later check, megatron-core's included, sees none), ``cuda``
    requires a GPU, ``auto`` uses one when there is one."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            raise ConfigError("trainer.device=cpu, but this process touched CUDA before it could hide the GPUs; "
                              "run with CUDA_VISIBLE_DEVICES= set", key="trainer.device")
    elif choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda, but torch sees no CUDA device (a CPU build of torch, no driver, or "
                          "CUDA_VISIBLE_DEVICES empty); use trainer.device=cpu or auto", key="trainer.device")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_parallel(parallel: ParallelismConfig | None = None, seed: int = 0) -> None:
    """Initialize torch.distributed (if needed) and megatron's TP/PP/DP groups."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        apply_cpu_patches()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")
    world = dist.get_world_size()
    parallel = parallel or ParallelismConfig()
    tp, pp, ep = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.expert_parallel
    etp = parallel.expert_tensor_parallel
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp*pp = {tp * pp}")
    if (world // pp) % (ep * etp):
        raise ValueError(f"parallel.expert_parallel x parallel.expert_tensor_parallel = {ep} x {etp} must divide the "
                         f"{world // pp} ranks of a pipeline stage")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # the experts' own layout (qwen_vl.moe_config): split over EP ranks, each expert over ETP ranks
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def trainer_processes(cfg: RunConfig, model_path: str) -> Iterator[int]:
    """Threads and process groups for the body of a job (the layout checked against the model
    at ``model_path`` first); yields this process's rank. The groups are torn down however the
    body ends (a data or config error after start-up included). Under torchrun a rank ends
    with its agent (SIGKILLed, the agent cannot stop the rank itself)."""
    if under_torchrun():
        exit_with_parent(os.getppid())
    select_device(cfg.trainer.device)
    torch.set_num_threads(cfg.trainer.num_threads)
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")), model_path)
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        yield dist.get_rank()
    finally:
        destroy_parallel()

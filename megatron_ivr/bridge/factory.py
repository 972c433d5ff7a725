"""The rollout side of an RL run, wired: the engine a config asks for (rank 0) and the weight
bridge that pushes the policy into it after every optimizer step (every rank).

    rollout.backend=local   the in-process engine; the bridge copies tensors into it
    rollout.backend=sglang  a client of the servers; the bridge sends over
                            ``rollout.weight_transport`` (tensor, distributed, disk), per
                            pipeline stage with ``rollout.sync_per_stage`` under PP
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ivr.bridge.bridge import WeightBridge
from megatron_ivr.bridge.transports import DistributedTransport, transport_by_name
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.model_providers.build import is_stage_leader
from megatron_ivr.model_providers.policy import Policy
from megatron_ivr.model_providers.state_dict_adapter import detect_key_style
from megatron_ivr.rollout.factory import make_engine
from megatron_ivr.rollout.sglang.client import SGLangClient


def make_rollout(cfg: RunConfig, policy: Policy, processor, rank: int) -> tuple[Optional[object], WeightBridge]:
    """The engine (rank 0; None elsewhere) and this rank's weight bridge (collective)."""
    engine, transport, names = _engine(cfg, processor) if rank == 0 else (None, None, None)
    per_stage = per_stage_sync(cfg)
    if per_stage:
        transport = _stage_transport(cfg, engine, transport)
    bridge = WeightBridge(policy.model, transport, expected_names=names, bucket_bytes=cfg.rollout.bucket_mb * 1024**2,
                          key_style=_engine_key_style(names, policy.key_style), per_stage=per_stage)
    return engine, bridge


def _engine(cfg: RunConfig, processor):
    """The rollout engine, its weight transport and (local engine) the parameter names it serves."""
    engine = make_engine(cfg.rollout, cfg.model.path, processor, cfg.trainer.prompts_per_step * cfg.rollout.n)
    if cfg.rollout.backend == "local":
        return engine, transport_by_name("local", engine=engine), engine.parameter_names()
    transport = transport_by_name(cfg.rollout.weight_transport, client=engine.client,
                                  directory=str(Path(cfg.checkpoint.dir) / "weight_sync"),
                                  source_model_dir=cfg.model.path, master_address=cfg.rollout.sync_master_address,
                                  server_tp_size=cfg.rollout.server_tp_size, pause_mode=pause_mode(cfg))
    return engine, transport, None


def pause_mode(cfg: RunConfig) -> Optional[str]:
    """Async rollouts abort what is in flight at a push (``rollout/partial.py`` continues it)."""
    return "abort" if cfg.rollout.mode == "async" else None


def per_stage_sync(cfg: RunConfig) -> bool:
    """The ``distributed`` transport under pipeline parallelism sends per stage (bridge.py)."""
    return (cfg.rollout.backend == "sglang" and cfg.rollout.weight_transport == "distributed"
            and cfg.parallel.pipeline_parallel > 1 and cfg.rollout.sync_per_stage)


def _stage_transport(cfg: RunConfig, engine, rank0_transport):
    """Each pipeline stage's leader gets a ``distributed`` transport of its own (group
    ``megatron_ivr_weights_stage{k}``) to the servers rank 0 drives; None on other ranks."""
    holder = [([s.url for s in engine.client.servers], engine.client.api_key) if engine is not None else None]
    dist.broadcast_object_list(holder, src=0)  # the server manager may have picked the ports on rank 0
    urls, api_key = holder[0]
    stage = ps.get_pipeline_model_parallel_rank()
    group_name = f"megatron_ivr_weights_stage{stage}"
    if dist.get_rank() == 0:
        rank0_transport.group_name = group_name
        return rank0_transport
    if not is_stage_leader():
        return None
    local = cfg.rollout.sync_master_address in (None, "127.0.0.1", "localhost")
    address = os.environ.get("IVR_SYNC_ADDRESS") or ("127.0.0.1" if local else
                                                     socket.gethostbyname(socket.gethostname()))
    return DistributedTransport(SGLangClient(urls, api_key=api_key), master_address=address,
                                server_tp_size=cfg.rollout.server_tp_size, group_name=group_name,
                                pause_mode=pause_mode(cfg) or "retract")


def _engine_key_style(names, default: str) -> str:
    """The HF naming the engine serves (the in-process transformers model uses the nested
    names; SGLang loads the checkpoint's own style); decided on rank 0, agreed by all."""
    holder = [detect_key_style(names) if names else default]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def close_rollout(bridge: WeightBridge, rank: int) -> None:
    """The distributed transport's update group, on the servers and here (a server given by URL
    outlives the run), and a stage leader's own client."""
    transport = bridge.transport
    if transport is not None and hasattr(transport, "close"):
        transport.close()
    if rank != 0 and transport is not None:
        transport.client.close()

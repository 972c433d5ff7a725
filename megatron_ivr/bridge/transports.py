"""How buckets reach a rollout engine. Each transport implements ``prepare()`` (on every
rank that sends: connect), ``begin(version)`` and ``finish(version)`` (the engine's update
session, on trainer rank 0) and ``send(bucket)``; the bridge drives them.

- ``local``: load into the in-process engine (CPU laptop path);
- ``tensor``: SGLang ``/update_weights_from_tensor`` in the ``flattened_bucket`` format,
  wrapped in ``/begin_weight_update`` ... ``/end_weight_update`` (required, else HTTP 400)
  and in pause -> buckets -> continue. On CPU the tensors travel by value (pickled and
  base64-encoded: SGLang's own multiprocessing serializer crashed the server with CPU
  tensors). With CUDA the bucket is pickled with torch's multiprocessing reductions, so the
  payload carries a CUDA-IPC handle (``rebuild_cuda_tensor``, on SGLang's allow-list) and
  the server copies device to device; the bucket stays alive until the server has answered.
  That GPU path is written but has not run (no GPU was available to this work);
- ``disk``: safetensors shards written atomically, then ``/update_weights_from_disk``.

- ``distributed``: a process group between trainer rank 0 and every server rank, created
  the way SGLang's own helper creates it (a plain ``init_process_group`` would hang: the
  trainer already has a default group), then per bucket ``/update_weights_from_distributed``
  (``flattened_bucket``) while rank 0 broadcasts the bucket; NCCL on GPU, gloo on CPU.
  With pipeline parallelism there is one such group per stage (``group_name`` ends in the
  stage), led by that stage's leader: stages send their own layers (the bridge's
  ``per_stage``). SGLang keeps its groups by name and serves the stages' requests in order.
"""

from __future__ import annotations

import base64
import pickle
import shutil
import threading
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from torch.distributed import TCPStore

from megatron_ivr.bridge.buckets import Bucket, unflatten
from megatron_ivr.model_providers.hf_checkpoint import write_hf_folder
from megatron_ivr.model_providers.output_dir import output_kind
from megatron_ivr.model_providers.parallel import free_port


class LocalTransport:
    """The engine is paused for the update (a generation in flight on the generator thread,
    ``rollout.mode=async``, returns its partial responses) and resumed on the new weights."""

    name = "local"

    def __init__(self, engine):
        self.engine = engine
        self._version = 0

    def prepare(self) -> None:
        pass

    def begin(self, version: int) -> None:
        self._version = version
        self.engine.pause("abort")

    def send(self, bucket: Bucket) -> None:
        self.engine.update_weights(unflatten(bucket), version=self._version)

    def finish(self, version: int) -> None:
        self.engine.set_weight_version(version)
        self.engine.resume()


def begin_sglang_update(client, pause_mode: str = "retract") -> None:
    """Open a weight update on every server: pause generation, start the update session
    (without it SGLang answers 400 to tensor and distributed updates)."""
    client.call_all("/pause_generation", {"mode": pause_mode})
    client.call_all("/begin_weight_update", {"selector": "all"})


def finish_sglang_update(client, version: int) -> None:
    """Close a weight update on every server: end the update session, set the version,
    drop cached prefixes computed with the old weights, resume generation."""
    client.call_all("/end_weight_update", {})
    client.call_all("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
    client.call_all("/flush_cache", {})
    client.call_all("/continue_generation", {})


class TensorTransport:
    name = "tensor"

    def __init__(self, client, server_tp_size: int = 1, pause_mode: str = "retract"):
        self.client, self.server_tp_size, self.pause_mode = client, server_tp_size, pause_mode

    def prepare(self) -> None:
        pass

    def begin(self, version: int) -> None:
        begin_sglang_update(self.client, self.pause_mode)

    def send(self, bucket: Bucket) -> None:
        payload = {"flattened_tensor": bucket.flat, "metadata": bucket.metadata}
        if torch.cuda.is_available():
            from torch.multiprocessing.reductions import ForkingPickler

            payload["flattened_tensor"] = bucket.flat.cuda()
            data = bytes(ForkingPickler.dumps(payload))  # a CUDA-IPC handle, not the bytes
        else:
            data = pickle.dumps(payload)  # by value
        encoded = base64.b64encode(data).decode()
        self.client.call_all("/update_weights_from_tensor", {
            "serialized_named_tensors": [encoded] * self.server_tp_size, "load_format": "flattened_bucket",
            "flush_cache": False})

    def finish(self, version: int) -> None:
        finish_sglang_update(self.client, version)


class DiskTransport:
    """``pause_mode`` (async rollouts: ``abort``) pauses the servers around the load; without it
    SGLang waits for the running requests to finish before it loads."""

    name = "disk"

    def __init__(self, client, directory: str | Path, source_model_dir: str | Path, keep: int = 1,
                 pause_mode: Optional[str] = None):
        self.client, self.directory, self.source = client, Path(directory), Path(source_model_dir)
        self.keep, self.pause_mode = keep, pause_mode
        self._pending: list[tuple[str, object]] = []

    def prepare(self) -> None:
        pass

    def begin(self, version: int) -> None:
        self._pending = []

    def send(self, bucket: Bucket) -> None:
        self._pending.extend((name, tensor.clone()) for name, tensor in unflatten(bucket))

    def finish(self, version: int) -> None:
        out = write_hf_folder(self._pending, self.directory / f"step_{version:08d}", self.source)
        self._pending = []
        if self.pause_mode:
            self.client.call_all("/pause_generation", {"mode": self.pause_mode})
        self.client.call_all("/update_weights_from_disk", {"model_path": str(out), "weight_version": str(version),
                                                           "flush_cache": True})
        if self.pause_mode:
            self.client.call_all("/continue_generation", {})
        ours = sorted(f for f in self.directory.glob("step_*") if output_kind(f) == "hf")  # only what it wrote
        for folder in ours[:-self.keep] if self.keep else []:
            shutil.rmtree(folder, ignore_errors=True)


def init_update_group(master_address: str, master_port: int, world_size: int, group_name: str,
                      backend: str, timeout_s: float = 300.0):
    """Rank 0 of a process group outside the default one, as SGLang's
    ``init_custom_process_group`` builds it (a TCP store hosted here, a prefix store per group
    name). The store is created explicitly: under torchrun, torch's ``tcp://`` rendezvous
    would expect the elastic agent to host it and wait forever."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout, multi_tenant=True)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, 0, [], Backend(backend), store, group_name=group_name,
                                         backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _in_thread(fn, *args) -> threading.Thread:
    """Run a blocking HTTP call beside a collective it waits for; errors surface on join."""
    errors: list = []

    def run():
        try:
            fn(*args)
        except Exception as exc:  # re-raised by the caller after the collective
            errors.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def _join(thread: threading.Thread) -> None:
    thread.join()
    if thread.errors:
        raise thread.errors[0]


class DistributedTransport:
    name = "distributed"

    def __init__(self, client, master_address: str = "127.0.0.1", master_port: Optional[int] = None,
                 server_tp_size: int = 1, backend: Optional[str] = None, group_name: str = "megatron_ivr_weights",
                 pause_mode: str = "retract"):
        self.client, self.server_tp_size, self.group_name = client, server_tp_size, group_name
        self.pause_mode = pause_mode
        self.master_address, self.master_port = master_address, master_port or free_port()
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.group = None

    def _connect(self) -> None:
        servers = len(self.client.servers)
        world = 1 + servers * self.server_tp_size
        calls = [_in_thread(self._init_server, index, 1 + index * self.server_tp_size, world)
                 for index in range(servers)]
        self.group = init_update_group(self.master_address, self.master_port, world, self.group_name, self.backend)
        for call in calls:
            _join(call)

    def _init_server(self, index: int, rank_offset: int, world: int) -> None:
        server = self.client.servers[index]
        self.client.run(self.client._post(server.url, "/init_weights_update_group", {
            "master_address": self.master_address, "master_port": self.master_port, "rank_offset": rank_offset,
            "world_size": world, "group_name": self.group_name, "backend": self.backend}))

    def prepare(self) -> None:
        if self.group is None:
            self._connect()

    def begin(self, version: int) -> None:
        begin_sglang_update(self.client, self.pause_mode)

    def send(self, bucket: Bucket) -> None:
        request = {"names": [m.name for m in bucket.metadata],
                   "dtypes": [str(m.dtype).replace("torch.", "") for m in bucket.metadata],
                   "shapes": [list(m.shape) for m in bucket.metadata], "group_name": self.group_name,
                   "load_format": "flattened_bucket", "flush_cache": False}
        call = _in_thread(self.client.call_all, "/update_weights_from_distributed", request)
        flat = bucket.flat.cuda() if self.backend == "nccl" else bucket.flat
        torch.distributed.broadcast(flat, src=0, group=self.group)
        _join(call)

    def finish(self, version: int) -> None:
        finish_sglang_update(self.client, version)

    def close(self) -> None:
        if self.group is not None:
            self.client.call_all("/destroy_weights_update_group", {"group_name": self.group_name})
            torch.distributed.destroy_process_group(self.group)
            self.group = None


def transport_by_name(name: str, engine=None, client=None, directory: Optional[str] = None,
                      source_model_dir: Optional[str] = None, master_address: Optional[str] = None,
                      server_tp_size: int = 1, pause_mode: Optional[str] = None):
    """``master_address``: where the servers reach this process for ``distributed``
    (default 127.0.0.1). ``pause_mode``: how the servers pause for an update (None: each
    transport's default, ``retract``, none for ``disk``; ``abort`` for async rollouts, whose
    in-flight requests come back partial and are continued on the new weights)."""
    if name == "local":
        return LocalTransport(engine)
    if name == "tensor":
        return TensorTransport(client, server_tp_size=server_tp_size, pause_mode=pause_mode or "retract")
    if name == "disk":
        return DiskTransport(client, directory, source_model_dir, pause_mode=pause_mode)
    if name == "distributed":
        return DistributedTransport(client, master_address=master_address or "127.0.0.1",
                                    server_tp_size=server_tp_size, pause_mode=pause_mode or "retract")
    raise ValueError(f"unknown weight transport {name!r}; choose local, tensor, disk or distributed")

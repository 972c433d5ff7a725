"""How buckets reach a rollout engine. Each transport implements ``begin(version)``,
``send(bucket)`` and ``finish(version)``; the bridge drives them.

- ``local``: load into the in-process engine (CPU laptop path);
- ``tensor``: SGLang ``/update_weights_from_tensor`` in the ``flattened_bucket`` format,
  wrapped in ``/begin_weight_update`` ... ``/end_weight_update`` (required, else HTTP 400)
  and in pause -> buckets -> continue. On CPU the tensors travel by value (pickled and
  base64-encoded: SGLang's own multiprocessing serializer crashed the server with CPU
  tensors); on GPU the same payload would carry CUDA-IPC handles (not implemented here:
  no GPU was available to build and test it);
- ``disk``: safetensors shards written atomically, then ``/update_weights_from_disk``.

(``distributed``, NCCL/gloo broadcast through ``/init_weights_update_group``, is not
implemented yet.)
"""

from __future__ import annotations

import base64
import pickle
import shutil
from pathlib import Path
from typing import Optional

from megatron_ivr.bridge.buckets import Bucket, unflatten


class LocalTransport:
    name = "local"

    def __init__(self, engine):
        self.engine = engine
        self._version = 0

    def begin(self, version: int) -> None:
        self._version = version

    def send(self, bucket: Bucket) -> None:
        self.engine.update_weights(unflatten(bucket), version=self._version)

    def finish(self, version: int) -> None:
        self.engine.set_weight_version(version)


class TensorTransport:
    name = "tensor"

    def __init__(self, client, server_tp_size: int = 1, pause_mode: str = "retract"):
        self.client, self.server_tp_size, self.pause_mode = client, server_tp_size, pause_mode

    def begin(self, version: int) -> None:
        self.client.call_all("/pause_generation", {"mode": self.pause_mode})
        self.client.call_all("/begin_weight_update", {"selector": "all"})

    def send(self, bucket: Bucket) -> None:
        data = pickle.dumps({"flattened_tensor": bucket.flat, "metadata": bucket.metadata})
        encoded = base64.b64encode(data).decode()
        self.client.call_all("/update_weights_from_tensor", {
            "serialized_named_tensors": [encoded] * self.server_tp_size, "load_format": "flattened_bucket",
            "flush_cache": False})

    def finish(self, version: int) -> None:
        self.client.call_all("/end_weight_update", {})
        self.client.call_all("/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
        self.client.call_all("/flush_cache", {})
        self.client.call_all("/continue_generation", {})


class DiskTransport:
    name = "disk"

    def __init__(self, client, directory: str | Path, source_model_dir: str | Path, keep: int = 1):
        self.client, self.directory, self.source = client, Path(directory), Path(source_model_dir)
        self.keep = keep
        self._pending: list[tuple[str, object]] = []

    def begin(self, version: int) -> None:
        self._pending = []

    def send(self, bucket: Bucket) -> None:
        self._pending.extend((name, tensor.clone()) for name, tensor in unflatten(bucket))

    def finish(self, version: int) -> None:
        from model_providers.hf_checkpoint import write_hf_folder

        out = write_hf_folder(self._pending, self.directory / f"step_{version:08d}", self.source)
        self._pending = []
        self.client.call_all("/update_weights_from_disk", {"model_path": str(out), "weight_version": str(version),
                                                           "flush_cache": True})
        old = sorted(self.directory.glob("step_*"))[:-self.keep] if self.keep else []
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)


def transport_by_name(name: str, engine=None, client=None, directory: Optional[str] = None,
                      source_model_dir: Optional[str] = None):
    if name == "local":
        return LocalTransport(engine)
    if name == "tensor":
        return TensorTransport(client)
    if name == "disk":
        return DiskTransport(client, directory, source_model_dir)
    raise ValueError(f"unknown weight transport {name!r}; choose local, tensor or disk")

"""The weight bridge: after an optimizer step, move the policy from the Megatron shards into
the rollout engine, tagged with the trainer step as its weight version.

``sync(version)`` is collective over the trainer ranks. Rank 0 checks every name against the
names the engine serves (a wrong name is an error, never silently dropped: SGLang itself
answers ``success`` for names it ignores), packs the stream into flattened buckets, hands
them to the transport, and reports seconds and bytes. Every ``verify_every`` syncs it
checks that the engine really holds the new weights with ``verify()``, called on every rank
(``bridge/verify.py``'s log-prob probe is collective).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

from megatron_ivr.bridge.buckets import bucketize
from model_providers.build import iter_hf_weights


class WeightSyncError(RuntimeError):
    pass


@dataclass
class SyncReport:
    version: int
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    verified: bool

    def metrics(self) -> dict:
        return {"weight_sync/seconds": self.seconds, "weight_sync/bytes": self.bytes,
                "weight_sync/tensors": self.tensors, "weight_sync/buckets": self.buckets,
                "weight_sync/version": self.version, "weight_sync/verified": int(self.verified)}


class WeightBridge:
    def __init__(self, model, transport, expected_names: Optional[Iterable[str]] = None,
                 bucket_bytes: int = 512 * 1024**2, key_style: str = "legacy",
                 verify: Optional[Callable[[], object]] = None, verify_every: int = 1):
        self.model, self.transport = model, transport
        self.expected = set(expected_names) if expected_names is not None else None
        self.bucket_bytes, self.key_style = bucket_bytes, key_style
        self.verify, self.verify_every = verify, verify_every
        self.syncs = 0

    def _checked(self, stream, seen: set, counters: dict):
        for name, tensor in stream:
            if self.expected is not None and name not in self.expected:
                raise WeightSyncError(f"weight {name!r} is not a parameter of the engine's model")
            if name in seen:
                raise WeightSyncError(f"weight {name!r} sent twice in one sync")
            seen.add(name)
            counters["bytes"] += tensor.numel() * tensor.element_size()
            yield name, tensor

    def _verify_due(self) -> bool:
        return self.verify is not None and (self.syncs - 1) % self.verify_every == 0

    def sync(self, version: int) -> Optional[SyncReport]:
        import torch.distributed as dist

        start = time.perf_counter()
        stream = iter_hf_weights(self.model, self.key_style)
        if dist.get_rank() != 0:
            for _ in stream:  # take part in the collectives
                pass
            self.syncs += 1
            if self._verify_due():
                self.verify()
            return None
        seen: set = set()
        counters = {"bytes": 0, "buckets": 0}
        self.transport.begin(version)
        for bucket in bucketize(self._checked(stream, seen, counters), self.bucket_bytes):
            self.transport.send(bucket)
            counters["buckets"] += 1
        if self.expected is not None and seen != self.expected:
            missing = sorted(self.expected - seen)[:5]
            raise WeightSyncError(f"{len(self.expected - seen)} engine weights were not sent, e.g. {missing}")
        self.transport.finish(version)
        self.syncs += 1
        verified = self._verify_due()
        if verified:
            self.verify()
        return SyncReport(version, time.perf_counter() - start, counters["bytes"], len(seen), counters["buckets"],
                          verified)

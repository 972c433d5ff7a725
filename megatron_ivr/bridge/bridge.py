"""The weight bridge: after an optimizer step, move the policy from the Megatron shards into
the rollout engine, tagged with the trainer step as its weight version.

``sync(version)`` is collective over the trainer ranks. Two shapes:

- funnel (``per_stage=False``): every pipeline stage streams its weights to trainer rank 0,
  which checks every name against the names the engine serves (a wrong name is an error,
  never silently dropped: SGLang itself answers ``success`` for names it ignores), packs the
  stream into flattened buckets and hands them to its transport;
- per stage (``per_stage=True``, the ``distributed`` transport with pipeline parallelism):
  each stage's leader (TP rank 0 of DP rank 0) gathers its own TP shards and sends its own
  layers through its own transport (one broadcast group per stage), so stages send in
  parallel and no tensor takes the detour through rank 0. Rank 0 opens the engine's update
  session before any stage sends (barrier), collects every stage's names afterwards, checks
  that each weight came exactly once, and closes the session.

It reports seconds and bytes. Every ``verify_every`` syncs it checks that the engine really
holds the new weights with ``verify()``, called on every rank (``bridge/verify.py``'s
log-prob probe is collective).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_ivr.bridge.buckets import bucketize
from megatron_ivr.model_providers.build import is_stage_leader, iter_hf_weights, iter_stage_hf_weights


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
                 verify: Optional[Callable[[], object]] = None, verify_every: int = 1, per_stage: bool = False):
        """``transport``: rank 0's (funnel), or each stage leader's (``per_stage``); None elsewhere."""
        self.model, self.transport, self.per_stage = model, transport, per_stage
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
        if self.per_stage:
            return self._sync_per_stage(version)
        start = time.perf_counter()
        stream = iter_hf_weights(self.model, self.key_style)
        if dist.get_rank() != 0:
            for _ in stream:  # take part in the collectives
                pass
            self._after_sync()
            return None
        self.transport.prepare()
        self.transport.begin(version)
        seen, counters = self._send(stream)
        self._check_complete(seen)
        self.transport.finish(version)
        verified = self._after_sync()
        return SyncReport(version, time.perf_counter() - start, counters["bytes"], len(seen), counters["buckets"],
                          verified)

    def _send(self, stream) -> tuple[set, dict]:
        """Check, bucket and send a stream; the names sent and the bytes and buckets."""
        seen: set = set()
        counters = {"bytes": 0, "buckets": 0}
        for bucket in bucketize(self._checked(stream, seen, counters), self.bucket_bytes):
            self.transport.send(bucket)
            counters["buckets"] += 1
        return seen, counters

    def _check_complete(self, sent: set) -> None:
        if self.expected is not None and sent != self.expected:
            missing = sorted(self.expected - sent)[:5]
            raise WeightSyncError(f"{len(self.expected - sent)} engine weights were not sent, e.g. {missing}")

    def _after_sync(self) -> bool:
        """Count the sync and run ``verify`` when due (on every rank: the probe is collective)."""
        self.syncs += 1
        due = self._verify_due()
        if due:
            self.verify()
        return due

    def _sync_per_stage(self, version: int) -> Optional[SyncReport]:
        start = time.perf_counter()
        rank0 = dist.get_rank() == 0
        leader = is_stage_leader()
        if leader and self.transport is None:
            raise WeightSyncError(f"rank {dist.get_rank()} leads a pipeline stage but has no transport")
        if leader:
            self.transport.prepare()  # e.g. join this stage's broadcast group (first sync)
        if rank0:
            self.transport.begin(version)  # the engine's update session, once for all stages
        dist.barrier()
        stream = iter_stage_hf_weights(self.model, self.key_style)
        if leader:
            seen, counters = self._send(stream)
        else:
            for _ in stream:  # take part in the stage's TP gathers
                pass
        parts = [None] * dist.get_world_size() if rank0 else None
        dist.gather_object((sorted(seen), counters) if leader else None, parts, dst=0)
        report = None
        if rank0:
            parts = [part for part in parts if part]
            sent = Counter(name for names, _ in parts for name in names)
            twice = sorted(name for name, count in sent.items() if count > 1)
            if twice:
                raise WeightSyncError(f"weights sent by more than one pipeline stage, e.g. {twice[:5]}")
            self._check_complete(set(sent))
            self.transport.finish(version)
            total = {key: sum(counts[key] for _, counts in parts) for key in ("bytes", "buckets")}
            report = SyncReport(version, 0.0, total["bytes"], len(sent), total["buckets"], False)
        dist.barrier()  # no stage sends the next version before this one is closed
        verified = self._after_sync()
        if report is not None:
            report.verified, report.seconds = verified, time.perf_counter() - start
        return report

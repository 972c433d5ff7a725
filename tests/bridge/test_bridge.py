"""The weight bridge: buckets, name checks, and a TP2 x PP2 sync that delivers tensors
bit-identical to the converter's export into the in-process engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ivr.bridge.buckets import bucketize, flatten, unflatten
from megatron_ivr.model_providers.parallel import free_port

WORKER = Path(__file__).with_name("bridge_worker.py")


def test_flatten_round_trip_mixed_dtypes():
    named = [("a", torch.randn(3, 4)), ("b", torch.arange(5, dtype=torch.int64)),
             ("c", torch.randn(2, 2).to(torch.bfloat16)), ("d", torch.randn(7, 1)[::2])]  # non-contiguous input
    bucket = flatten(named)
    assert bucket.flat.dtype == torch.uint8 and bucket.nbytes == 48 + 40 + 8 + 16
    for (name, tensor), (got_name, got) in zip(named, unflatten(bucket)):
        assert got_name == name and got.dtype == tensor.dtype and torch.equal(got, tensor)
    meta = bucket.metadata[1]
    assert (meta.start_idx, meta.end_idx, meta.numel) == (48, 88, 40)


def test_bucketize_respects_the_size_and_keeps_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]  # float32: 4 bytes each
    buckets = list(bucketize(iter(named), bucket_bytes=80))
    assert [b.names for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert all(b.nbytes <= 80 for b in buckets if len(b.names) > 1)  # a larger tensor travels alone


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", pytest.param("qwen3_5", marks=pytest.mark.slow)])
def test_sync_at_tp2_pp2_is_bit_identical_to_the_converter_export(model_dirs, tmp_path, family):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(free_port()), str(WORKER), str(tmp_path), "2", "2", str(model_dirs(family))]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["same_names"] and results["bit_identical"] and results["engine_updated"]
    assert results["engine_version"] == 5
    assert results["buckets"] > 1 and results["bytes"] > 0


def test_per_stage_sync_sends_each_stage_from_its_own_leader(tiny_models, tmp_path):
    """TP2 x PP2 with one transport per stage leader (ranks 0 and 2): the stages' sends are
    disjoint, together they are the whole model, bit-identical to the converter's export."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(free_port()), str(WORKER), str(tmp_path), "2", "2", str(tiny_models["qwen2_5_vl"]), "per_stage"]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["senders"] == 2 and results["disjoint"]
    assert results["same_names"] and results["bit_identical"]
    assert results["engine_version"] == 5  # rank 0 closed the session for every stage
    assert results["tensors"] == results["expected_tensors"]
    assert results["buckets"] >= 2 and results["bytes"] > 0


def test_wrong_or_missing_names_are_errors():
    from megatron_ivr.bridge.bridge import WeightBridge, WeightSyncError

    bridge = WeightBridge(model=None, transport=None, expected_names=["a", "b"])
    stream = bridge._checked(iter([("a", torch.zeros(1)), ("typo", torch.zeros(1))]), set(), {"bytes": 0})
    assert next(stream)[0] == "a"
    with pytest.raises(WeightSyncError, match="'typo' is not a parameter"):
        next(stream)
    stream = bridge._checked(iter([("a", torch.zeros(1)), ("a", torch.zeros(1))]), set(), {"bytes": 0})
    next(stream)
    with pytest.raises(WeightSyncError, match="sent twice"):
        next(stream)

"""The CPU platform layer: each patch does its one job, and nothing is patched with CUDA."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_ivr.model_providers.platform import PATCHES, apply_cpu_patches


@pytest.fixture(scope="module", autouse=True)
def patched():
    return apply_cpu_patches()


def test_all_patches_applied_once(patched):
    assert patched == list(PATCHES)
    assert apply_cpu_patches() == patched  # idempotent


def test_cuda_device_queries():
    assert torch.cuda.current_device() == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"


def test_cuda_rng_tracker_forks_the_cpu_generator():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig(), seed=123)  # seeds the tracker through the patched CUDA RNG calls
    try:
        _check_fork(get_cuda_rng_tracker)
    finally:
        destroy_parallel()


def _check_fork(get_cuda_rng_tracker):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    assert torch.equal(after, expected)  # the default stream is restored after the fork
    assert not torch.equal(inside, expected)  # the fork draws from the model-parallel seed


def test_cuda_sync_calls_are_no_ops():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.current_stream().wait_stream(None)
    side = torch.cuda.Stream()  # the MoE token dispatcher's device-to-host stream
    side.wait_stream(torch.cuda.current_stream())
    event = torch.cuda.current_stream().record_event()
    event.synchronize()
    assert event.query() and isinstance(torch.cuda.Event(), torch.cuda.Event)


def test_moe_router_and_split_sizes_without_te():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert moe_utils.te_general_gemm is None  # the router's plain matmul path, not a NameError
    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert splits.tolist() == [3, 1] and not torch.is_tensor(splits)  # what all_to_all_single takes
    kept = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]))
    assert torch.is_tensor(kept)


def test_cuda_literals_in_megatron_modules():
    from megatron.core import utils
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert utils.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert schedules.torch.ones(2).dtype == torch.float32  # everything else is the real torch
    assert torch.zeros(1).device.type == "cpu"


def test_tensor_cuda_and_type_names():
    t = torch.zeros(2)
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversions still convert


def test_nothing_is_patched_when_cuda_is_available():
    code = ("import torch; torch.cuda.is_available = lambda: True; original = torch.cuda.current_device; "
            "from megatron_ivr.model_providers.platform import apply_cpu_patches; "
            "assert apply_cpu_patches() == []; assert torch.cuda.current_device is original; "
            "assert torch.Tensor.type(torch.zeros(1)) == 'torch.FloatTensor'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


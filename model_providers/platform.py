"""Make megatron-core run on CPU under gloo (the laptop path). GPU runs never call this.

megatron-core assumes CUDA in a few places that matter for our models: the RNG tracker
reads and writes CUDA generator states, ``torch.cuda.current_device()`` is used as a
device in tensor factories (rotary embeddings, the global memory buffer of attention, the
optimizer's ``found_inf``), and some code synchronizes streams. Each patch below maps one
of these to its CPU equivalent; :func:`apply_cpu_patches` applies them once, only when no
CUDA device is in use, and records which it applied (``APPLIED``). Every patch has a test
in ``tests/model_providers/test_platform.py``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer.moe import moe_utils, token_dispatcher

logger = logging.getLogger(__name__)

APPLIED: list[str] = []


def _patch_cuda_device_queries() -> None:
    """``torch.cuda.current_device()`` is used as a tensor device: answer ``"cpu"``."""
    torch.cuda.current_device = lambda: "cpu"


def _patch_cuda_rng() -> None:
    """The model-parallel RNG tracker saves, seeds and restores CUDA generator states: use
    the CPU generator instead (dropout and CPU initialization draw from it)."""
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_cuda_sync() -> None:
    """Stream and cache calls have nothing to do on CPU."""
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda device=None: _NullStream()
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Stream = _NullStream  # the MoE token dispatcher makes one (a class: annotations use it)
    torch.cuda.Event = _NullEvent


class _NullStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()


class _NullEvent:
    """A recorded point on a CPU "stream": everything before it has already happened."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like")
# megatron-core modules that create tensors with device="cuda" (or torch.cuda.current_device())
_CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",  # the local multi-tensor L2 norm (no Apex/TE) returns a CUDA tensor
)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare device index means a GPU


class _CpuTorch:
    """Stands in for the ``torch`` module inside megatron modules that hard-code CUDA
    devices: tensor factories asked for a CUDA device build CPU tensors; everything else is
    the real ``torch``."""

    def __init__(self):
        for name in _FACTORIES:
            setattr(self, name, self._factory(getattr(torch, name)))

    @staticmethod
    def _factory(fn):
        def wrapped(*args, **kwargs):
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return fn(*args, **kwargs)
        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


def _patch_cuda_literals() -> None:
    """Tensor factories with ``device="cuda"`` in the schedules, optimizer, gradient
    buffers and p2p communication build CPU tensors instead."""
    import importlib

    proxy = _CpuTorch()
    for module_name in _CUDA_LITERAL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # not present in this megatron-core version
            continue
        if getattr(module, "torch", None) is torch:
            module.torch = proxy


def _patch_tensor_cuda() -> None:
    """``tensor.cuda()`` (tied-embedding setup across pipeline stages, data broadcast) keeps
    the tensor on CPU."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


_CPU_TO_CUDA_TYPE = {"torch.FloatTensor": "torch.cuda.FloatTensor", "torch.HalfTensor": "torch.cuda.HalfTensor",
                     "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}


def _patch_tensor_type_names() -> None:
    """megatron's optimizers (distributed optimizer, mixed precision, gradient clipping)
    accept parameters by their ``tensor.type()`` name, which must be a ``torch.cuda.*`` one:
    on CPU, ``tensor.type()`` without arguments answers the CUDA name of the same dtype."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return _CPU_TO_CUDA_TYPE.get(name, name)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1's MoE router tests ``te_general_gemm is not None``, a name its
    ``moe_utils`` defines only when Transformer Engine imports (NameError on CPU): define it
    as absent, so the router takes its plain matmul path."""
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_moe_split_sizes() -> None:
    """The MoE all-to-all dispatcher moves its split sizes to the host as numpy arrays, which
    ``all_to_all_single`` takes, only when they are on a GPU; on a CPU they stay tensors,
    which the collective refuses (TypeError): convert them as the GPU path does."""
    original = moe_utils.maybe_move_tensor_to_cpu

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu = to_host


PATCHES = {
    "cuda_device_queries": _patch_cuda_device_queries,
    "cuda_rng": _patch_cuda_rng,
    "cuda_sync": _patch_cuda_sync,
    "cuda_literals": _patch_cuda_literals,
    "tensor_cuda": _patch_tensor_cuda,
    "tensor_type_names": _patch_tensor_type_names,
    "moe_router_without_te": _patch_moe_router_without_te,
    "moe_split_sizes": _patch_moe_split_sizes,
}


def apply_cpu_patches() -> list[str]:
    """Apply every CPU patch once. A no-op (returns []) when CUDA is available."""
    if torch.cuda.is_available():
        return []
    for name, patch in PATCHES.items():
        if name not in APPLIED:
            patch()
            APPLIED.append(name)
            logger.debug("applied CPU patch %s", name)
    return list(APPLIED)

"""CPU TEST HARNESS ONLY: lets SGLang 0.5.23 start on a machine without a GPU.

Installed into the separate SGLang environment (never the trainer's) by setup_env.sh and
imported at interpreter start through ``sglang_cpu_shim.pth``. It does two things:

1. torchvision's CPU wheel cannot load its compiled ops beside this torch (its ``_C.so`` is
   disabled by setup_env.sh); its Python side still registers fake kernels for
   ``torchvision::nms`` / ``qnms``, so their schemas are declared here.
2. ``sgl_kernel`` has no CPU build. A placeholder ``torch.ops.sgl_kernel`` namespace is
   registered with every op name SGLang looks up at import time (listed in
   ``sgl_kernel_ops.txt``), each raising if ever called, so that SGLang's model modules
   import and fall back to their native torch paths. ``convert_weight_packed`` is left
   out on purpose so that the AMX weight-packing path stays off.
"""

from __future__ import annotations

import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _declare_torchvision_ops() -> None:
    try:
        torch.ops.torchvision.nms  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_LIB"] = lib  # keep the library alive


def _placeholder_sgl_kernel_ops() -> None:
    path = os.path.join(_HERE, "sgl_kernel_ops.txt")
    if not os.path.exists(path):
        return
    names = [line.strip() for line in open(path) if line.strip() and not line.startswith("#")]
    lib = torch.library.Library("sgl_kernel", "DEF")
    for name in names:
        if name == "convert_weight_packed":
            continue
        lib.define(f"{name}(Tensor x) -> Tensor")

        def _refuse(x, _name=name):
            raise RuntimeError(f"sgl_kernel.{_name} is a CPU-harness placeholder and must not be called")

        lib.impl(name, _refuse, "CompositeExplicitAutograd")
    globals()["_SGL_KERNEL_LIB"] = lib


if os.environ.get("MEGATRON_IVR_SGLANG_CPU_SHIM", "1") == "1":
    _declare_torchvision_ops()
    _placeholder_sgl_kernel_ops()

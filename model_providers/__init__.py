"""Megatron-Core model providers: one module per model family, plus the shared pieces.

``get_provider(family)`` returns the family's :class:`~megatron_ivr.model_providers.qwen_vl.QwenVLFamily`,
which knows how to build the Megatron module from a Hugging Face config and owns the
family's state-dict adapter.
"""

from __future__ import annotations


def get_provider(family: str):
    if family == "qwen2_5_vl":
        from megatron_ivr.model_providers.qwen2_5_vl import QWEN2_5_VL

        return QWEN2_5_VL
    if family == "qwen3_vl":
        from megatron_ivr.model_providers.qwen3_vl import QWEN3_VL

        return QWEN3_VL
    raise ValueError(f"unknown model family {family!r}; choose qwen2_5_vl or qwen3_vl")

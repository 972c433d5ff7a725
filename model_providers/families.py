"""The model families the Megatron provider builds, by Hugging Face ``model_type``.

``get_provider(family)`` returns the family's :class:`~megatron_ivr.model_providers.qwen_vl.QwenVLFamily`,
which knows how to build the Megatron module from a Hugging Face config and owns the
family's state-dict adapter. A new family is one module beside ``qwen3_vl.py`` and one entry
in ``FAMILIES`` (docs/contributing.md).
"""

from __future__ import annotations

from megatron_ivr.model_providers.qwen2_5_vl import QWEN2_5_VL
from megatron_ivr.model_providers.qwen3_5 import QWEN3_5, QWEN3_5_MOE
from megatron_ivr.model_providers.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE

FAMILIES = {"qwen2_5_vl": QWEN2_5_VL, "qwen3_vl": QWEN3_VL, "qwen3_vl_moe": QWEN3_VL_MOE, "qwen3_5": QWEN3_5,
            "qwen3_5_moe": QWEN3_5_MOE}


def get_provider(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose {' or '.join(FAMILIES)}")
    return FAMILIES[family]

"""Qwen3-VL: interleaved MRoPE, QK-norm, no QKV bias, deepstack visual features; dense, and
with mixture-of-experts decoder layers (Qwen3-VL-30B-A3B, 235B-A22B)."""

from megatron_ivr.model_providers.qwen_vl import QwenVLFamily

QWEN3_VL = QwenVLFamily(
    name="qwen3_vl",
    hf_model_class="Qwen3VLForConditionalGeneration",
    hf_base_model_class="Qwen3VLModel",
    vision_class="Qwen3VLVisionModel",
    mrope_layout="interleaved",
    deepstack=True,
    qk_norm=True,
)

QWEN3_VL_MOE = QwenVLFamily(
    name="qwen3_vl_moe",
    hf_model_class="Qwen3VLMoeForConditionalGeneration",
    hf_base_model_class="Qwen3VLMoeModel",
    vision_class="Qwen3VLMoeVisionModel",
    mrope_layout="interleaved",
    deepstack=True,
    qk_norm=True,
    moe=True,
)

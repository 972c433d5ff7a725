"""Qwen3-VL (dense): interleaved MRoPE, QK-norm, no QKV bias, deepstack visual features."""

from megatron_ivr.model_providers.qwen_vl import QwenVLFamily

QWEN3_VL = QwenVLFamily(
    name="qwen3_vl",
    hf_model_class="Qwen3VLForConditionalGeneration",
    hf_base_model_class="Qwen3VLModel",
    vision_class="Qwen3VLVisionModel",
    mrope_layout="interleaved",
    deepstack=True,
)

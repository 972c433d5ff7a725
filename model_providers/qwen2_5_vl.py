"""Qwen2.5-VL: contiguous MRoPE sections, QKV bias, window-attention vision tower."""

from megatron_ivr.model_providers.qwen_vl import QwenVLFamily

QWEN2_5_VL = QwenVLFamily(
    name="qwen2_5_vl",
    hf_model_class="Qwen2_5_VLForConditionalGeneration",
    hf_base_model_class="Qwen2_5_VLModel",
    vision_class="Qwen2_5_VisionTransformerPretrainedModel",
    mrope_layout="contiguous",
    deepstack=False,
)

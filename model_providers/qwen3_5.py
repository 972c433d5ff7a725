"""Qwen3.5: the natively multimodal hybrid Qwen. Three of every four decoder layers are Gated
DeltaNet linear attention (``model_providers/gated_delta_net.py``), the fourth gated full
attention (an output gate per head, QK-norm, a quarter of each head rotated with interleaved
MRoPE); RMSNorm weights centered on zero; the Qwen3-VL vision tower without deepstack;
multi-token-prediction heads in the checkpoint, carried through conversion and not trained
(``hf_checkpoint.carried_tensors``; docs/models.md). Qwen3.5-MoE: every MLP megatron-core's
MoE layer (transformers' router) with a shared expert behind a sigmoid gate."""

from megatron_ivr.model_providers.qwen_vl import QwenVLFamily

QWEN3_5 = QwenVLFamily(
    name="qwen3_5",
    hf_model_class="Qwen3_5ForConditionalGeneration",
    hf_base_model_class="Qwen3_5Model",
    vision_class="Qwen3_5VisionModel",
    mrope_layout="interleaved",
    deepstack=False,
    qk_norm=True,
    hybrid_linear_attention=True,
)

QWEN3_5_MOE = QwenVLFamily(
    name="qwen3_5_moe",
    hf_model_class="Qwen3_5MoeForConditionalGeneration",
    hf_base_model_class="Qwen3_5MoeModel",
    vision_class="Qwen3_5MoeVisionModel",
    mrope_layout="interleaved",
    deepstack=False,
    qk_norm=True,
    hybrid_linear_attention=True,
    moe=True,
)

"""Random tiny Qwen2.5-VL, Qwen3-VL(-MoE) and Qwen3.5 checkpoints in Hugging Face format, made offline.

The configs keep the real architectures' structure (GQA, MRoPE sections summing to
head_dim/2, Qwen2.5-VL window attention with a full-attention block, Qwen3-VL interleaved
MRoPE, QK-norm and deepstack; Qwen3.5's Gated DeltaNet layers between gated full-attention
layers, grouped value heads, partial rotary, multi-token-prediction heads) at a size that
trains on one CPU core. Each folder holds config, safetensors weights, tokenizer, chat
template and an image-only processor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from megatron_ivr.config.schema import TinyModelConfig
from megatron_ivr.models.processor import PATCH_SIZE, make_processor, model_family, save_processor

MODEL_CLASSES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "qwen3_vl": Qwen3VLForConditionalGeneration,
                 "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration, "qwen3_5": Qwen3_5ForConditionalGeneration,
                 "qwen3_5_moe": Qwen3_5MoeForConditionalGeneration}


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen (16, 24, 24)."""
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_config(family: str, cfg: TinyModelConfig, tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    head_dim = cfg.hidden_size // cfg.num_heads
    token_ids = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                     vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text = dict(
        # padded like real Qwen checkpoints (151936 > 151665 tokens): splits evenly over TP ranks
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size, num_heads=2,
                  intermediate_size=cfg.vision_hidden_size * 2, out_hidden_size=cfg.hidden_size,
                  patch_size=PATCH_SIZE[family], spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta or 1000000.0,
                                   "mrope_section": _mrope_section(head_dim)}
        vision.update(window_size=56, fullatt_block_indexes=[cfg.vision_depth - 1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        text.update(head_dim=head_dim)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta or 5000000.0,
                                   "mrope_section": _mrope_section(head_dim), "mrope_interleaved": True}
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        if family == "qwen3_vl":
            return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids)
        text.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token,
                    moe_intermediate_size=cfg.expert_intermediate_size or cfg.hidden_size * 3 // 4,
                    decoder_sparse_step=1, mlp_only_layers=[])
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    if family in QWEN3_5_FAMILIES:
        return _qwen3_5_config(family, cfg, text, vision, token_ids)
    raise ValueError(f"unknown model family {family!r}; choose from {list(MODEL_CLASSES)}")


QWEN3_5_FAMILIES = ("qwen3_5", "qwen3_5_moe")
QWEN3_5_FULL_ATTENTION_INTERVAL = 2  # the released models: 4 (three Gated DeltaNet layers, then full attention)
QWEN3_5_PARTIAL_ROTARY = 0.25  # the released models' share of each head that is rotated


def _qwen3_5_config(family: str, cfg: TinyModelConfig, text: dict, vision: dict, token_ids: dict):
    """Qwen3.5: layers alternate Gated DeltaNet and gated full attention (every second layer
    here, so that two layers hold one of each and a two-stage pipeline puts one on each
    stage); value heads twice the key heads (grouped, like the released models' 32 / 16);
    heads wider than ``hidden / heads`` (the released 256 at 4096 / 16) with a quarter of each
    rotated (MRoPE, interleaved); untied embeddings; one multi-token-prediction layer.
    Qwen3.5-MoE: every MLP a mixture of experts plus a shared expert behind a sigmoid gate
    (the released 35B-A3B: 256 experts, 8 per token, expert 512, shared expert 512)."""
    head_dim = 2 * cfg.hidden_size // cfg.num_heads
    half = int(head_dim * QWEN3_5_PARTIAL_ROTARY) // 2
    layer_types = ["full_attention" if (i + 1) % QWEN3_5_FULL_ATTENTION_INTERVAL == 0 else "linear_attention"
                   for i in range(cfg.num_layers)]
    text.update(head_dim=head_dim, layer_types=layer_types, linear_conv_kernel_dim=4,
                linear_key_head_dim=cfg.hidden_size // 4, linear_value_head_dim=cfg.hidden_size // 4,
                linear_num_key_heads=2, linear_num_value_heads=4, mtp_num_hidden_layers=1)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta or 10000000.0,
                               "mrope_section": _mrope_section(2 * half), "mrope_interleaved": True,
                               "partial_rotary_factor": QWEN3_5_PARTIAL_ROTARY}
    vision.update(num_position_embeddings=64)
    if family == "qwen3_5":
        return Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    expert = cfg.expert_intermediate_size or cfg.hidden_size * 3 // 4
    text.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.experts_per_token, moe_intermediate_size=expert,
                shared_expert_intermediate_size=2 * expert)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)


@torch.no_grad()
def _spread_norm_weights(model) -> None:
    """Move the language model's norm weights off their initial values (0 for Qwen3.5's
    zero-centered norms, 1 for the Gated DeltaNet output norm), as training does: a model
    that took ``w`` for ``1 + w`` (or the reverse) then computes something else."""
    for name, param in model.named_parameters():
        if "language_model" in name and "norm" in name and param.dim() == 1:
            param.add_(torch.randn_like(param) * 0.1)


def _write_attention_interval(path: Path) -> None:
    """``text_config.full_attention_interval`` as the released Qwen3.5 configs have it (SGLang
    derives the layer kinds from it; transformers reads ``layer_types`` and drops it on save)."""
    config = json.loads(path.read_text())
    config["text_config"]["full_attention_interval"] = QWEN3_5_FULL_ATTENTION_INTERVAL
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _add_mtp_heads(path: Path, hf_config) -> None:
    """Random multi-token-prediction tensors under the released checkpoints' names (``mtp.*``):
    transformers does not build them and skips them on load; the converters carry them."""
    text = hf_config.text_config
    hidden, heads, kv, head_dim = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    shapes = {"mtp.fc.weight": (hidden, 2 * hidden), "mtp.norm.weight": (hidden,),
              "mtp.pre_fc_norm_embedding.weight": (hidden,), "mtp.pre_fc_norm_hidden.weight": (hidden,),
              "mtp.layers.0.input_layernorm.weight": (hidden,),
              "mtp.layers.0.post_attention_layernorm.weight": (hidden,),
              "mtp.layers.0.self_attn.q_proj.weight": (2 * heads * head_dim, hidden),
              "mtp.layers.0.self_attn.k_proj.weight": (kv * head_dim, hidden),
              "mtp.layers.0.self_attn.v_proj.weight": (kv * head_dim, hidden),
              "mtp.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
              "mtp.layers.0.self_attn.q_norm.weight": (head_dim,), "mtp.layers.0.self_attn.k_norm.weight": (head_dim,)}
    experts = getattr(text, "num_experts", None)
    mlps = {"mtp.layers.0.mlp.": text.intermediate_size} if not experts else {
        **{f"mtp.layers.0.mlp.experts.{e}.": text.moe_intermediate_size for e in range(experts)},
        "mtp.layers.0.mlp.shared_expert.": text.shared_expert_intermediate_size}
    for prefix, size in mlps.items():
        shapes.update({prefix + "gate_proj.weight": (size, hidden), prefix + "up_proj.weight": (size, hidden),
                       prefix + "down_proj.weight": (hidden, size)})
    if experts:
        shapes.update({"mtp.layers.0.mlp.gate.weight": (experts, hidden),
                       "mtp.layers.0.mlp.shared_expert_gate.weight": (1, hidden)})
    tensors = load_file(str(path))
    tensors.update({name: torch.randn(shape) * 0.02 for name, shape in shapes.items()})
    save_file(tensors, str(path), metadata={"format": "pt"})


def make_tiny_model(family: str, cfg: TinyModelConfig, tokenizer, output_dir: str | Path,
                    min_pixels: int, max_pixels: int) -> Path:
    """Build, save and return the folder of one random tiny model."""
    output_dir = Path(output_dir)
    torch.manual_seed(cfg.seed)
    model = MODEL_CLASSES[family](tiny_config(family, cfg, tokenizer))
    if family in QWEN3_5_FAMILIES:
        _spread_norm_weights(model)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(output_dir))
    if family == "qwen3_vl_moe":
        _experts_in_disk_layout(output_dir / "model.safetensors")
    if family in QWEN3_5_FAMILIES:
        _add_mtp_heads(output_dir / "model.safetensors", model.config)
        _write_attention_interval(output_dir / "config.json")
    save_processor(make_processor(family, tokenizer, min_pixels, max_pixels), family, output_dir)
    return output_dir


def _experts_in_disk_layout(path: Path) -> None:
    """Write the fused expert tensors as the released Qwen3-VL-MoE checkpoints hold them
    (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``; SGLang's loader expects it), not in
    transformers' in-memory layout, which ``save_pretrained`` writes; transformers reads both."""
    tensors = load_file(str(path))
    for name, tensor in tensors.items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[name] = tensor.transpose(1, 2).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    return MODEL_CLASSES[model_family(path)].from_pretrained(str(path), dtype=dtype)

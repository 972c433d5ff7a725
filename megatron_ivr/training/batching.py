"""From (prompt, images, response tokens) to right-padded :class:`ModelBatch` micro-batches.

- :func:`encode` runs the processor once per sequence (:class:`PromptCache` shares one
  processor call between the samples of a group, which have the same prompt and image).
- :func:`plan_micro_batches` groups sequences of similar length under a token budget, so
  padding stays small; :func:`padding_share` is the metric.
- :func:`collate` right-pads a group into a :class:`ModelBatch`. Right padding keeps every
  real token's attention and positions exactly as in an unpadded forward pass (causal
  attention never looks right), so no padding mask is needed.
- :func:`response_values` / :func:`scatter_responses` move per-response vectors in and out of
  the ``[B, S]`` layout (position ``t`` scores token ``t + 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from PIL import Image

from megatron_ivr.prompts import chat_prompt
from megatron_ivr.training.logprobs import ModelBatch


@dataclass
class ScoredSequence:
    prompt: str  # user text, without chat markup
    images: list[Image.Image] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)


@dataclass
class EncodedPrompt:
    ids: list[int]
    mm_types: list[int]
    pixel_values: Optional[torch.Tensor] = None
    grid: Optional[torch.Tensor] = None


@dataclass
class Encoded:
    """One sequence after the processor: prompt ids (image placeholders expanded), the
    multimodal token types, the image tensors, and the response ids."""

    prompt: EncodedPrompt
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt.ids) + len(self.response_ids)


class PromptCache:
    """Processor outputs by (prompt text, image identities): a group's G samples share one call."""

    def __init__(self, processor):
        self.processor = processor
        self._cache: dict = {}

    def __call__(self, prompt: str, images: list[Image.Image]) -> EncodedPrompt:
        key = (prompt, tuple(id(image) for image in images))
        if key not in self._cache:
            text = chat_prompt(self.processor, prompt, len(images))
            out = self.processor(text=[text], images=images or None, return_tensors="pt")
            encoded = EncodedPrompt(out["input_ids"][0].tolist(), out["mm_token_type_ids"][0].tolist(),
                                    out.get("pixel_values") if images else None,
                                    out.get("image_grid_thw") if images else None)
            self._cache[key] = (encoded, images)  # the images stay alive while their ids are a key
        return self._cache[key][0]


def encode(prompts: PromptCache, item: ScoredSequence) -> Encoded:
    return Encoded(prompts(item.prompt, item.images), list(item.response_ids))


def collate(family, hf_config, items: list[Encoded], pad_id: int, pad_to_multiple: int = 1) -> ModelBatch:
    """Right-padded batch; ``loss_mask`` marks the positions that predict response tokens."""
    from model_providers.qwen_vl import position_ids

    length = max(item.length for item in items)
    length = -(-length // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    mm_types = torch.zeros((len(items), length), dtype=torch.long)
    loss_mask = torch.zeros((len(items), length), dtype=torch.float32)
    pixel_values, grids = [], []
    for i, item in enumerate(items):
        row = item.prompt.ids + item.response_ids
        start = len(item.prompt.ids)
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        mm_types[i, :start] = torch.tensor(item.prompt.mm_types)
        loss_mask[i, start - 1:len(row) - 1] = 1.0  # position t scores token t + 1
        if item.prompt.pixel_values is not None:
            pixel_values.append(item.prompt.pixel_values)
            grids.append(item.prompt.grid)
    grid = torch.cat(grids) if grids else None
    positions = position_ids(family, hf_config, input_ids, attention, mm_types, grid)
    return ModelBatch(input_ids, positions, loss_mask, torch.cat(pixel_values) if pixel_values else None, grid,
                      extra={"attention_mask": attention, "mm_token_type_ids": mm_types,
                             "prompt_lengths": [len(item.prompt.ids) for item in items],
                             "response_lengths": [len(item.response_ids) for item in items]})


def build_model_batch(processor, family, hf_config, items: list[ScoredSequence],
                      pad_to_multiple: int = 1) -> ModelBatch:
    """One batch straight from (prompt, images, response) triples."""
    prompts = PromptCache(processor)
    return collate(family, hf_config, [encode(prompts, item) for item in items], processor.tokenizer.pad_token_id,
                   pad_to_multiple)


def plan_micro_batches(lengths: list[int], max_tokens: int, min_count: int = 1) -> list[list[int]]:
    """Indices grouped into micro-batches whose padded size (rows x longest) stays within
    ``max_tokens`` (a longer single sequence gets a micro-batch of its own). Sequences are
    taken longest first, so each micro-batch holds similar lengths. At least ``min_count``
    micro-batches are made (one per data-parallel rank) while sequences allow. The plan
    depends only on the lengths, so every layout makes the same one."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    plan: list[list[int]] = []
    for index in order:
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(index)
        else:
            plan.append([index])
    while len(plan) < min(min_count, len(lengths)):
        largest = max(range(len(plan)), key=lambda k: (len(plan[k]), -k))
        group = plan.pop(largest)
        plan[largest:largest] = [group[:len(group) // 2], group[len(group) // 2:]]
    return plan


def padding_share(lengths: list[int], plan: list[list[int]]) -> float:
    """Share of the padded micro-batch tokens that are padding."""
    padded = sum(len(group) * max(lengths[i] for i in group) for group in plan)
    return 1.0 - sum(lengths) / padded if padded else 0.0


def response_values(tensor: torch.Tensor, batch: ModelBatch) -> list[torch.Tensor]:
    """Per row, the values at the positions that score its response tokens."""
    out = []
    for row, (start, count) in enumerate(zip(batch.extra["prompt_lengths"], batch.extra["response_lengths"])):
        out.append(tensor[row, start - 1:start - 1 + count])
    return out


def scatter_responses(values: list, batch: ModelBatch, fill: float = 0.0) -> torch.Tensor:
    """Inverse of :func:`response_values`: per-response vectors into a ``[B, S]`` tensor."""
    out = torch.full(batch.input_ids.shape, fill, dtype=torch.float32)
    for row, (start, vector) in enumerate(zip(batch.extra["prompt_lengths"], values)):
        vector = torch.as_tensor(vector, dtype=torch.float32)
        out[row, start - 1:start - 1 + vector.numel()] = vector
    return out

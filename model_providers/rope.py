"""Multimodal rotary position embeddings (MRoPE) of Qwen2.5-VL and Qwen3-VL for megatron-core.

Each of the ``head_dim / 2`` rotary frequencies reads one of the three position axes
(temporal, height, width):

- ``contiguous`` (Qwen2.5-VL): the first ``s_t`` frequencies read T, the next ``s_h`` read H,
  the last ``s_w`` read W (``mrope_section = [s_t, s_h, s_w]``);
- ``interleaved`` (Qwen3-VL): frequency ``j`` reads H when ``j % 3 == 1`` and ``j < 3 s_h``,
  W when ``j % 3 == 2`` and ``j < 3 s_w``, else T.

The module replaces megatron-core's ``MultimodalRotaryEmbedding`` inside ``GPTModel`` (same
call signature) and returns ``[S, B, 1, head_dim]`` frequencies for megatron's non-interleaved
rotary application, which is the ``rotate_half`` form transformers uses.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def frequency_axes(mrope_section: list[int], layout: str) -> torch.Tensor:
    """For each of the ``sum(mrope_section)`` frequencies, the position axis (0=T, 1=H, 2=W)."""
    half = sum(mrope_section)
    if layout == "contiguous":
        return torch.cat([torch.full((n,), axis, dtype=torch.long) for axis, n in enumerate(mrope_section)])
    if layout == "interleaved":
        axes = torch.zeros(half, dtype=torch.long)
        for axis in (1, 2):
            axes[axis:mrope_section[axis] * 3:3] = axis
        return axes
    raise ValueError(f"unknown MRoPE layout {layout!r}; choose contiguous or interleaved")


class QwenMRoPE(nn.Module):
    def __init__(self, head_dim: int, rotary_base: float, mrope_section: list[int], layout: str):
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axes", frequency_axes(mrope_section, layout), persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section=None,
                cp_group: Optional[torch.distributed.ProcessGroup] = None) -> torch.Tensor:
        """``position_ids``: ``[3, B, S]``. Returns ``[S, B, 1, head_dim]`` rotary angles."""
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("context parallelism is not supported with Qwen-VL MRoPE yet")
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [3, B, S, half]
        index = self.axes.to(freqs.device)[None, None, None, :].expand(1, *freqs.shape[1:])
        selected = freqs.gather(0, index)[0]  # [B, S, half]: each frequency from its own axis
        emb = torch.cat((selected, selected), dim=-1)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()

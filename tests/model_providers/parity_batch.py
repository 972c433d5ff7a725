"""The batch of the parity tests: several images of different sizes, a two-image sample,
padding (different lengths) and a text-only sample; and the same prompts without images."""

from __future__ import annotations

import torch
from PIL import Image

from megatron_ivr.model_providers.batching import ScoredSequence


def parity_items() -> tuple[list[ScoredSequence], list[ScoredSequence]]:
    g = torch.Generator().manual_seed(0)

    def response(n):
        return torch.randint(20, 400, (n,), generator=g).tolist()

    red = Image.new("RGB", (112, 112), (200, 30, 30))
    red.paste((20, 20, 220), (20, 30, 60, 90))
    with_image = [
        ScoredSequence("How many red objects?", [red], response(9)),
        ScoredSequence("Compare the two images.", [Image.new("RGB", (56, 112), "blue"),
                                                    Image.new("RGB", (112, 56), "green")], response(5)),
        ScoredSequence("A question without an image.", [], response(12)),
    ]
    without_image = [ScoredSequence(item.prompt, [], item.response_ids) for item in with_image]
    return with_image, without_image

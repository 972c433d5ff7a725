"""Check that an engine really serves the weights just pushed: a greedy log-prob probe.

Rank 0 asks the engine for a short greedy completion of a fixed prompt with an image; the
tokens are broadcast to every trainer rank; the Megatron model scores them (all ranks, any
TP x PP layout); rank 0 compares the engine's log-probs with the trainer's. A mismatch
beyond ``tolerance`` means weights were dropped, misnamed or stale (SGLang answers
``success`` for names it ignores, and its image cache can keep old vision features), and is
an error. Called by :class:`~megatron_ivr.bridge.bridge.WeightBridge` every ``verify_every``
syncs, on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from PIL import Image

from megatron_ivr.bridge.bridge import WeightSyncError
from megatron_ivr.model_providers.batching import ScoredSequence, build_model_batch
from megatron_ivr.model_providers.logprobs import forward_logprobs
from megatron_ivr.model_providers.qwen_vl import causal_mask
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.rollout.engine import GenerationRequest, SamplingParams


def probe_image() -> Image.Image:
    image = Image.new("RGB", (112, 112), (235, 235, 228))
    image.paste((220, 40, 40), (10, 10, 50, 50))
    image.paste((40, 80, 220), (60, 60, 100, 100))
    return image


class LogprobProbe:
    def __init__(self, model, processor, engine=None, prompt: str = "Describe the image.", max_new_tokens: int = 8,
                 tolerance: float = 1e-3):
        self.model, self.processor, self.engine = model, processor, engine
        self.prompt, self.max_new_tokens, self.tolerance = prompt, max_new_tokens, tolerance
        self.banned = tuple(vision_token_ids(processor.tokenizer))  # the engines' distribution has none
        self.last_max_diff = None

    def __call__(self) -> float:
        image = probe_image()
        header = torch.zeros(self.max_new_tokens + 1, dtype=torch.long)
        engine_logprobs = None
        if dist.get_rank() == 0:
            completion = self.engine.generate([GenerationRequest(self.prompt, [image], "weight-probe")],
                                              SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0))[0][0]
            ids = completion.token_ids[:self.max_new_tokens]
            header[0] = len(ids)
            header[1:1 + len(ids)] = torch.tensor(ids)
            engine_logprobs = torch.tensor(completion.logprobs[:len(ids)])
        dist.broadcast(header, src=0)
        ids = header[1:1 + int(header[0])].tolist()
        batch = build_model_batch(self.processor, self.model.family, self.model.hf_config,
                                  [ScoredSequence(self.prompt, [image], ids)], pad_to_multiple=self.model.row_alignment)
        with torch.no_grad():
            record = forward_logprobs(self.model, [batch], causal_mask, banned_token_ids=self.banned)[0]
        if dist.get_rank() != 0:
            return 0.0
        trainer = record["logprobs"][0].cpu()[batch.loss_mask[0].bool()]
        max_diff = (trainer - engine_logprobs).abs().max().item() if ids else 0.0
        self.last_max_diff = max_diff
        if not ids or max_diff > self.tolerance:
            raise WeightSyncError(f"weight probe: the engine's log-probs differ from the trainer's by {max_diff:.2e} "
                                  f"(tolerance {self.tolerance:.0e}) over {len(ids)} tokens")
        return max_diff

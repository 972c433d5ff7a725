"""Routing replay (model_providers/routing.py): the local engine's recorded expert choices are
the trainer's own on the CPU fp32 path (mismatch 0, log-probs within 1e-5, whatever the row
layout, a continued partial rollout included); after a small perturbation of the trainer's
routers some tokens go to other experts, the metric counts them, and replaying the engine's
choices brings the log-probs back to the engine's."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_ivr.config.schema import ParallelismConfig
from megatron_ivr.model_providers.batching import Packing, ScoredSequence, build_model_batch
from megatron_ivr.model_providers.logprobs import forward_logprobs
from megatron_ivr.model_providers.parallel import destroy_parallel, device, init_parallel
from megatron_ivr.model_providers.policy import load_policy
from megatron_ivr.model_providers.qwen_vl import causal_mask
from megatron_ivr.model_providers.routing import reset_statistics, routing_metrics
from megatron_ivr.models.processor import load_processor
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.rollout.engine import Completion, GenerationRequest, SamplingParams
from megatron_ivr.rollout.local import LocalEngine

ONE_PER_ROW = Packing()


@pytest.fixture(scope="module")
def rollouts(tiny_moe_model):
    """Three sampled responses to each of two prompts with images of two sizes (left padding
    and a shared prefill in the engine), and one response continued from an aborted prefix."""
    engine = LocalEngine.from_pretrained(tiny_moe_model, batch_size=8)
    images = [Image.new("RGB", (56, 56), (200, 10, 10)), Image.effect_noise((84, 56), 60).convert("RGB")]
    requests = [GenerationRequest("how many?", [images[0]]), GenerationRequest("what colour is it", [images[1]])]
    sampling = SamplingParams(max_new_tokens=24, n=3, seed=0, return_routed_experts=True)
    groups = engine.generate(requests, sampling)
    first = groups[0][0]
    aborted = Completion("", first.token_ids[:5], first.logprobs[:5], "abort", 0)
    continued = engine.generate([GenerationRequest(requests[0].text, requests[0].images, partial=aborted)],
                                SamplingParams(max_new_tokens=24, n=1, seed=1, return_routed_experts=True))[0][0]
    pairs = [(r, c) for r, group in zip(requests, groups) for c in group] + [(requests[0], continued)]
    return tiny_moe_model, pairs


def _score(policy, processor, pairs, replay: bool, packing: Packing = ONE_PER_ROW):
    """Per-token |trainer - engine| log-prob differences and the routing metrics of one pass."""
    items = [ScoredSequence(r.text, r.images, c.token_ids, c.routed_experts) for r, c in pairs]
    batch = build_model_batch(processor, policy.family, policy.hf_config, items, packing=packing)
    batch.extra["routing_replay"] = replay
    reset_statistics(policy.model.router_hooks)
    record = forward_logprobs(policy.model, [batch], causal_mask,
                              banned_token_ids=tuple(vision_token_ids(processor.tokenizer)))[0]
    got = batch.responses(record["logprobs"])
    diffs = torch.cat([(got[i, :c.num_tokens] - torch.tensor(c.logprobs)).abs() for i, (_, c) in enumerate(pairs)])
    text = policy.hf_config.text_config
    return diffs, routing_metrics(policy.model.router_hooks, 0, text.num_hidden_layers, text.num_experts, device())


def test_engine_routing_is_the_trainers_and_replay_undoes_a_router_perturbation(rollouts):
    path, pairs = rollouts
    continued = pairs[-1][1]
    assert continued.token_versions is not None and continued.num_tokens > 5
    for _, completion in pairs:  # every fed token: the prompt, then all response tokens but the last
        assert completion.routed_experts.shape[1:] == (2, 2)
    init_parallel(ParallelismConfig())
    try:
        policy, processor = load_policy(path), load_processor(path)
        layers = policy.hf_config.text_config.num_hidden_layers
        prompt_tokens = [pair[1].routed_experts.shape[0] - pair[1].num_tokens + 1 for pair in pairs]
        expected_known = sum(p + c.num_tokens - 1 for p, (_, c) in zip(prompt_tokens, pairs))
        for replay, packing in ((False, Packing()), (True, Packing()), (True, Packing(share_prompts=True))):
            diffs, metrics = _score(policy, processor, pairs, replay, packing)
            assert diffs.max() < 1e-5, (replay, packing)
            assert metrics["routing/mismatch"] == 0.0
            # a shared prompt copy (all but its last token) is routed once: the first prompt has 4
            # responses (the continued one too), the second 3
            assert metrics["routing/known_tokens"] == (expected_known if not packing.share_prompts else
                                                       expected_known - 3 * (prompt_tokens[0] - 1)
                                                       - 2 * (prompt_tokens[3] - 1))
            assert [metrics[f"routing/mismatch_layer{i}"] for i in range(layers)] == [0.0] * layers
            assert metrics["moe/load_max_over_mean"] >= 1.0

        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in policy.model.language.decoder.layers:
                weight = layer.mlp.router.weight
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.03 * weight.abs().mean())
        own, own_metrics = _score(policy, processor, pairs, replay=False)
        replayed, replay_metrics = _score(policy, processor, pairs, replay=True)
        assert own_metrics["routing/mismatch"] > 0.005  # some near ties flipped
        assert replay_metrics["routing/mismatch"] > 0.005  # still measured: the router's own choice
        assert own.max() > 5e-3  # a token on other experts moves the log-probs
        assert replayed.max() < 1e-3 and replayed.max() * 20 < own.max()
        assert replayed.mean() * 10 < own.mean()
    finally:
        destroy_parallel()

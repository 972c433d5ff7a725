"""The IVR-R1 loop end to end with a real tiny Qwen2.5-VL through the in-process engine."""

from __future__ import annotations

from megatron_ivr.algorithms.ivr import ReReasoningLoop, ScoredResponse, mixed_groups
from megatron_ivr.config.schema import IvrConfig, RewardConfig
from megatron_ivr.data import ImageRules, read_dataset
from megatron_ivr.prompts import render_prompt
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.local import LocalEngine


class CountingEngine:
    """Wraps the real engine to count calls and generated tokens per stage."""

    def __init__(self, inner):
        self.inner, self.calls, self.tokens = inner, [], {}

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, requests, sampling):
        out = self.inner.generate(requests, sampling)
        stage = requests[0].request_id.rsplit("/", 1)[-1]
        self.calls.append((stage, len(requests)))
        self.tokens[stage] = self.tokens.get(stage, 0) + sum(c.num_tokens for group in out for c in group)
        return out


def test_loop_with_the_tiny_model(tiny_models, synthetic_dir):
    samples = read_dataset(synthetic_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=3).samples
    queries = list(samples)
    engine = CountingEngine(LocalEngine.from_pretrained(tiny_models["qwen2_5_vl"], batch_size=8))
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, n=4, seed=0)
    with RewardFunction(RewardConfig()) as real_reward:
        rollouts = engine.generate([GenerationRequest(render_prompt("response", "ivr", question=q.question),
                                                      q.images, f"{q.id}/rollout") for q in queries], sampling)
        groups = [[ScoredResponse(c.text, c.token_ids, r.total, c.logprobs)
                   for c, r in zip(group, real_reward([c.text for c in group], [q.answer] * len(group)))]
                  for q, group in zip(queries, rollouts)]

    # A random model never answers correctly, so verification uses a reward that accepts
    # about half of the rewrites (even character count): the loop's bookkeeping is what is
    # checked here, on real generations.
    def parity_reward(responses, answers):
        return [float(len(r) % 2 == 0) for r in responses]

    cfg = IvrConfig(tau=1.0, max_rectified=2, max_rounds=3, critique_max_new_tokens=12)
    result = ReReasoningLoop(engine, parity_reward, cfg, max_new_tokens=16).run(queries, groups)
    m = result.metrics
    assert m["ivr/eroded"] == 12 and m["ivr/eroded_share"] == 1.0  # all 3 x 4 rollouts failed
    assert m["ivr/accepted"] == sum(len(r) for r in result.rectified) > 0
    assert all(len(r) <= 2 for r in result.rectified)
    assert sum(m[f"ivr/accepted_round_{k}"] for k in (1, 2, 3)) == m["ivr/accepted"]
    assert m["ivr/critiques"] == sum(n for stage, n in engine.calls if stage == "critique")
    assert m["ivr/critique_tokens"] == engine.tokens["critique"]
    assert m["ivr/rectify_tokens"] == engine.tokens["rectify"]
    assert m["ivr/engine_calls"] == len(engine.calls) - 1  # all but the rollout call
    for rectified in (r for rs in result.rectified for r in rs):
        assert rectified.rectified and len(rectified.text) % 2 == 0 and len(rectified.logprobs) == len(
            rectified.token_ids)
    batch = mixed_groups(groups, result.rectified)
    assert len(batch.responses) == 12 + m["ivr/accepted"]
    assert int(batch.rectified.sum()) == m["ivr/accepted"]

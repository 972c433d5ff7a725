"""IVR-R1's iterative visual-grounded re-reasoning loop (spec section 4).

Per training step, after the on-policy group of each query has been scored:

1. *screen*: a response is grounding-eroded when its reward is below ``tau``;
2. *localize*: the policy critiques each eroded response, with the image re-injected;
3. *rectify*: the policy rewrites the response given the image (or, in the ``description``
   ablation, a text description of it), the failed response and the critique;
4. *verify*: the rewrite is scored with the same reward and accepted at ``>= tau``; a failed
   rewrite goes round again (its own critique) up to ``max_rounds``; at most ``K`` accepted
   rewrites are kept per query.

All critiques of a round go to the engine in one call, then all rectifications in one call.
The loop depends only on :class:`~megatron_ivr.rollout.engine.RolloutEngine` and a reward
function ``(responses, answers) -> rewards``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_ivr.algorithms.advantages import group_advantages
from megatron_ivr.config.schema import IvrConfig
from megatron_ivr.data.sample import Sample
from megatron_ivr.prompts import render_prompt
from megatron_ivr.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams


@dataclass
class ScoredResponse:
    text: str
    token_ids: list[int]
    reward: float
    logprobs: list[float] = field(default_factory=list)
    rectified: bool = False
    round: int = 0  # 0 for on-policy; the loop round that produced a rectified response


@dataclass
class IvrResult:
    rectified: list[list[ScoredResponse]]  # per query, at most K
    metrics: dict


def _reward_value(value) -> float:
    return float(getattr(value, "total", value))


class ReReasoningLoop:
    def __init__(self, engine: RolloutEngine, reward_fn: Callable[[Sequence[str], Sequence[str]], list],
                 cfg: IvrConfig, template: str = "ivr", max_new_tokens: int = 128, temperature: float = 1.0,
                 top_p: float = 1.0):
        self.engine, self.reward_fn, self.cfg, self.template = engine, reward_fn, cfg, template
        self.critique_sampling = SamplingParams(max_new_tokens=cfg.critique_max_new_tokens, temperature=temperature,
                                                top_p=top_p, n=1)
        self.rectify_sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                               top_p=top_p, n=1)

    def _descriptions(self, queries: list[Sample], needed: set[int]) -> dict[int, str]:
        """Text descriptions for the ``description`` ablation: a sample's own (``meta["description"]``), else one
        batched call."""
        out = {i: queries[i].meta["description"] for i in needed if queries[i].meta.get("description")}
        missing = sorted(needed - set(out))
        if missing:
            requests = [GenerationRequest(render_prompt("describe", self.template), queries[i].images,
                                          f"{queries[i].id}/describe") for i in missing]
            completions = [c[0] for c in self.engine.generate(requests, self.critique_sampling)]
            for i, completion in zip(missing, completions):
                out[i] = completion.text
            self._metrics["ivr/engine_calls"] += 1
            self._metrics["ivr/describe_tokens"] += sum(c.num_tokens for c in completions)
        return out

    def run(self, queries: list[Sample], groups: list[list[ScoredResponse]]) -> IvrResult:
        if len(queries) != len(groups):
            raise ValueError(f"{len(queries)} queries but {len(groups)} response groups")
        cfg = self.cfg
        self._metrics = metrics = {"ivr/engine_calls": 0, "ivr/critiques": 0, "ivr/critique_tokens": 0,
                                   "ivr/rectify_tokens": 0, "ivr/describe_tokens": 0}
        accepted: list[list[ScoredResponse]] = [[] for _ in queries]
        eroded = [(qi, r.text) for qi, group in enumerate(groups) for r in group if r.reward < cfg.tau]
        total_on_policy = sum(len(g) for g in groups)
        metrics["ivr/eroded"] = len(eroded)
        metrics["ivr/eroded_share"] = len(eroded) / max(total_on_policy, 1)
        descriptions = {}
        if cfg.rectify_with == "description" and eroded and cfg.max_rectified > 0:
            descriptions = self._descriptions(queries, {qi for qi, _ in eroded})
        pending = eroded
        for round_index in range(1, cfg.max_rounds + 1):
            metrics[f"ivr/accepted_round_{round_index}"] = 0
            active = [(qi, failed) for qi, failed in pending if len(accepted[qi]) < cfg.max_rectified]
            if not active:
                continue
            critique_requests = [
                GenerationRequest(render_prompt("localize", self.template, question=queries[qi].question,
                                                response=failed), queries[qi].images, f"{queries[qi].id}/critique")
                for qi, failed in active]
            critiques = [c[0] for c in self.engine.generate(critique_requests, self.critique_sampling)]
            metrics["ivr/engine_calls"] += 1
            metrics["ivr/critiques"] += len(critiques)
            metrics["ivr/critique_tokens"] += sum(c.num_tokens for c in critiques)
            rectify_requests = []
            for (qi, failed), critique in zip(active, critiques):
                query = queries[qi]
                if cfg.rectify_with == "description":
                    question = f"Image description: {descriptions[qi]}\n\n{query.question}"
                    images = []
                else:
                    question, images = query.question, query.images
                prompt = render_prompt("rectify", self.template, question=question, response=failed,
                                       critique=critique.text)
                rectify_requests.append(GenerationRequest(prompt, images, f"{query.id}/rectify"))
            rewrites = [c[0] for c in self.engine.generate(rectify_requests, self.rectify_sampling)]
            metrics["ivr/engine_calls"] += 1
            metrics["ivr/rectify_tokens"] += sum(c.num_tokens for c in rewrites)
            rewards = [_reward_value(r) for r in self.reward_fn([c.text for c in rewrites],
                                                                [queries[qi].answer for qi, _ in active])]
            pending = []
            for (qi, _), rewrite, reward in zip(active, rewrites, rewards):
                if reward >= cfg.tau:
                    if len(accepted[qi]) < cfg.max_rectified:
                        accepted[qi].append(ScoredResponse(rewrite.text, list(rewrite.token_ids), reward,
                                                           list(rewrite.logprobs), True, round_index))
                        metrics[f"ivr/accepted_round_{round_index}"] += 1
                else:
                    pending.append((qi, rewrite.text))  # critique its own output next round
        num_accepted = sum(len(a) for a in accepted)
        metrics["ivr/accepted"] = num_accepted
        metrics["ivr/accepted_share"] = num_accepted / max(len(eroded), 1)
        metrics["ivr/queries_rectified"] = sum(1 for a in accepted if a)
        on_policy_rewards = [r.reward for g in groups for r in g]
        metrics["ivr/reward_on_policy"] = sum(on_policy_rewards) / max(len(on_policy_rewards), 1)
        rect_rewards = [r.reward for a in accepted for r in a]
        metrics["ivr/reward_rectified"] = sum(rect_rewards) / len(rect_rewards) if rect_rewards else 0.0
        return IvrResult(accepted, metrics)


@dataclass
class MixedGroupBatch:
    """Responses of all queries, flattened: on-policy first then rectified, group by group."""

    responses: list[ScoredResponse]
    group_ids: torch.Tensor  # [N] query index of each response
    rewards: torch.Tensor  # [N]
    rectified: torch.Tensor  # [N] bool
    advantages: torch.Tensor  # [N], over the combined group (spec section 4.6)


def mixed_groups(groups: list[list[ScoredResponse]], rectified: list[list[ScoredResponse]], eps: float = 1e-6,
                 normalize_by_std: bool = True) -> MixedGroupBatch:
    """Each group becomes its G on-policy responses plus its (up to K) rectified ones;
    advantages are computed over that combined group."""
    responses, group_ids = [], []
    for qi, (group, extra) in enumerate(zip(groups, rectified)):
        for response in list(group) + list(extra):
            responses.append(response)
            group_ids.append(qi)
    ids = torch.tensor(group_ids, dtype=torch.long)
    rewards = torch.tensor([r.reward for r in responses], dtype=torch.float32)
    advantages = group_advantages(rewards, ids, eps, normalize_by_std)
    return MixedGroupBatch(responses, ids, rewards, torch.tensor([r.rectified for r in responses]), advantages)

"""The IVR-R1 loop (spec section 4) against a scripted engine (a unit-test double), and the
mixed-group objective."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_ivr.algorithms.advantages import group_advantages
from megatron_ivr.algorithms.ivr import ReReasoningLoop, ScoredResponse, mixed_groups
from megatron_ivr.config.schema import IvrConfig
from megatron_ivr.data.sample import Sample
from megatron_ivr.rollout.engine import Completion

IMAGE = Image.new("RGB", (28, 28), (255, 0, 0))


class ScriptedEngine:
    """Critiques say 'critique'; a rectification succeeds (boxes the answer) from the round
    given per query id (None: never). Every call is recorded with its stage and size."""

    def __init__(self, success_round: dict, answers: dict):
        self.success_round, self.answers = success_round, answers
        self.calls: list[tuple[str, int]] = []
        self.requests = []
        self.outputs = []
        self.weight_version = 3

    def generate(self, requests, sampling):
        stages = {r.request_id.rsplit("/", 1)[1] for r in requests}
        assert len(stages) == 1, "one stage per engine call"
        stage = stages.pop()
        self.calls.append((stage, len(requests)))
        self.requests.append(requests)
        round_index = sum(1 for s, _ in self.calls if s == "rectify")
        out = []
        for r in requests:
            qid = r.request_id.split("/")[0]
            if stage == "critique":
                text = f"critique of {qid}"
            elif stage == "describe":
                text = f"a red square ({qid})"
            else:
                good = self.success_round[qid] is not None and round_index >= self.success_round[qid]
                text = f"\\boxed{{{self.answers[qid]}}}" if good else f"still wrong r{round_index}"
            out.append([Completion(text, list(range(len(text))), [-0.1] * len(text), "stop", 3)])
        self.outputs.append((stage, out))
        return out


def reward_fn(responses, answers):
    return [1.0 if f"\\boxed{{{a}}}" in r else 0.0 for r, a in zip(responses, answers)]


def make(num_queries=2, group=4, wrong_per_query=(2, 4)):
    queries = [Sample(f"q{i}", [IMAGE], f"question {i}", str(i + 1)) for i in range(num_queries)]
    groups = []
    for i, q in enumerate(queries):
        wrong = wrong_per_query[i]
        groups.append([ScoredResponse(f"wrong {k}", [1, 2], 0.0) for k in range(wrong)]
                      + [ScoredResponse(f"\\boxed{{{q.answer}}}", [1], 1.0) for _ in range(group - wrong)])
    return queries, groups


def run(success, cfg, **kwargs):
    queries, groups = make(**kwargs)
    engine = ScriptedEngine(success, {q.id: q.answer for q in queries})
    result = ReReasoningLoop(engine, reward_fn, cfg).run(queries, groups)
    return engine, result, groups


def test_nothing_eroded_makes_no_engine_call():
    engine, result, _ = run({"q0": 1, "q1": 1}, IvrConfig(), wrong_per_query=(0, 0))
    assert engine.calls == [] and result.rectified == [[], []]
    assert result.metrics["ivr/eroded_share"] == 0.0 and result.metrics["ivr/accepted"] == 0


def test_all_eroded_round_one_with_k_cap():
    engine, result, _ = run({"q0": 1, "q1": 1}, IvrConfig(max_rectified=2), wrong_per_query=(4, 4))
    assert engine.calls == [("critique", 8), ("rectify", 8)]  # everything of the round in one call per stage
    assert [len(r) for r in result.rectified] == [2, 2]  # K caps the 4 successes per query
    m = result.metrics
    assert m["ivr/eroded_share"] == 1.0 and m["ivr/critiques"] == 8
    assert m["ivr/accepted_round_1"] == 4 and m["ivr/accepted"] == 4 and m["ivr/accepted_share"] == 0.5
    assert all(r.rectified and r.round == 1 and r.reward == 1.0 for rs in result.rectified for r in rs)


@pytest.mark.parametrize("success_round", [1, 2, 3])
def test_rectification_succeeding_in_round(success_round):
    engine, result, _ = run({"q0": success_round, "q1": None}, IvrConfig(max_rounds=3, max_rectified=2))
    # q0 has 2 eroded, q1 has 4; q1 never succeeds, so every round runs for it
    assert [s for s, _ in engine.calls] == ["critique", "rectify"] * 3
    assert len(result.rectified[0]) == 2 and result.rectified[1] == []
    assert result.metrics[f"ivr/accepted_round_{success_round}"] == 2
    assert all(r.round == success_round for r in result.rectified[0])
    # a failed rewrite is critiqued again: round-2 critique prompts quote the round-1 rewrite
    if success_round > 1:
        assert "still wrong r1" in engine.requests[2][0].text
    sizes = [n for s, n in engine.calls if s == "critique"]
    assert sizes == [6 if r <= success_round else 4 for r in range(1, 4)]  # q0 leaves once it has K


def test_never_succeeding_stops_after_max_rounds():
    engine, result, _ = run({"q0": None, "q1": None}, IvrConfig(max_rounds=2))
    assert [s for s, _ in engine.calls] == ["critique", "rectify"] * 2
    assert result.rectified == [[], []] and result.metrics["ivr/accepted_share"] == 0.0
    assert result.metrics["ivr/critiques"] == 12 and result.metrics["ivr/engine_calls"] == 4


def test_k_zero_generates_nothing():
    engine, result, _ = run({"q0": 1, "q1": 1}, IvrConfig(max_rectified=0))
    assert engine.calls == [] and result.metrics["ivr/eroded"] == 6


def test_prompts_carry_image_question_failure_and_critique():
    engine, _, _ = run({"q0": 1, "q1": 1}, IvrConfig(), wrong_per_query=(1, 0))
    critique_req, rectify_req = engine.requests[0][0], engine.requests[1][0]
    assert critique_req.images == [IMAGE] and rectify_req.images == [IMAGE]
    assert "question 0" in critique_req.text and "wrong 0" in critique_req.text
    assert "critique of q0" in rectify_req.text


def test_description_ablation_replaces_the_image():
    engine, result, _ = run({"q0": 1, "q1": 1}, IvrConfig(rectify_with="description"), wrong_per_query=(1, 1))
    assert engine.calls[0] == ("describe", 2)  # one batched call for the descriptions
    rectify = engine.requests[2]
    assert all(r.images == [] for r in rectify) and "a red square (q0)" in rectify[0].text
    assert engine.requests[1][0].images == [IMAGE]  # the critique still sees the image
    assert result.metrics["ivr/accepted"] == 2


def test_metrics_count_tokens_and_rewards():
    engine, result, groups = run({"q0": 2, "q1": 1}, IvrConfig(max_rectified=1))
    m = result.metrics

    def tokens(stage):
        return sum(c[0].num_tokens for s, out in engine.outputs if s == stage for c in out)

    # round 1: 2 + 4 critiques; q1 accepts one (K=1) and stops; round 2: q0's 2 failed rewrites
    assert [n for s, n in engine.calls if s == "critique"] == [6, 2]
    assert m["ivr/critique_tokens"] == tokens("critique") > 0
    assert m["ivr/rectify_tokens"] == tokens("rectify") > 0
    assert m["ivr/reward_on_policy"] == pytest.approx(2 / 8)
    assert m["ivr/reward_rectified"] == 1.0 and m["ivr/queries_rectified"] == 2


def test_mixed_group_advantages_span_on_policy_and_rectified():
    queries, groups = make(wrong_per_query=(3, 0))
    rectified = [[ScoredResponse("\\boxed{1}", [1], 1.0, rectified=True, round=1)], []]
    batch = mixed_groups(groups, rectified)
    assert batch.group_ids.tolist() == [0] * 5 + [1] * 4
    assert batch.rectified.tolist() == [False] * 4 + [True] + [False] * 4
    expected = group_advantages(torch.tensor([0.0, 0, 0, 1, 1]), torch.zeros(5, dtype=torch.long))
    assert torch.allclose(batch.advantages[:5], expected)
    assert torch.equal(batch.advantages[5:], torch.zeros(4))  # an all-correct group learns nothing

import torch

from megatron_ivr.training.batching import padding_share, plan_micro_batches, response_values, scatter_responses
from megatron_ivr.training.logprobs import ModelBatch


def test_plan_respects_the_token_budget_and_covers_every_sequence():
    lengths = [50, 12, 48, 30, 31, 90, 11, 10]
    plan = plan_micro_batches(lengths, max_tokens=100)
    assert sorted(i for group in plan for i in group) == list(range(len(lengths)))
    for group in plan:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 100
    # similar lengths share a micro-batch: longest first
    assert plan[0] == [5]
    assert padding_share(lengths, plan) < padding_share(lengths, [list(range(len(lengths)))])


def test_plan_makes_one_micro_batch_per_data_parallel_rank_when_it_can():
    plan = plan_micro_batches([10] * 6, max_tokens=1000, min_count=4)
    assert len(plan) == 4 and sorted(i for g in plan for i in g) == list(range(6))
    assert plan_micro_batches([10] * 6, max_tokens=1000) == [list(range(6))]


def test_response_values_and_scatter_are_inverse():
    batch = ModelBatch(torch.zeros(2, 8, dtype=torch.long), torch.zeros(3, 2, 8, dtype=torch.long),
                       torch.zeros(2, 8), extra={"prompt_lengths": [3, 5], "response_lengths": [4, 2]})
    values = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 6.0])]
    dense = scatter_responses(values, batch)
    assert dense[0, 2:6].tolist() == [1, 2, 3, 4] and dense[1, 4:6].tolist() == [5, 6]
    assert dense.sum() == 21
    back = response_values(dense, batch)
    assert [v.tolist() for v in back] == [v.tolist() for v in values]

import torch

from megatron_ivr.training.batching import pad_responses, padding_share, plan_micro_batches, response_values
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


def test_response_values_and_pad_responses_round_trip():
    # two responses in one packed row: columns 2..5 and 6..7
    batch = ModelBatch(torch.zeros(1, 8, dtype=torch.long), torch.zeros(3, 1, 8, dtype=torch.long),
                       torch.zeros(1, 8), response_index=(torch.zeros(2, 4, dtype=torch.long),
                                                          torch.tensor([[2, 3, 4, 5], [6, 7, 0, 0]])),
                       response_mask=torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]]),
                       extra={"response_lengths": [4, 2]})
    dense = torch.arange(8.0)[None]
    values = response_values(dense, batch)
    assert [v.tolist() for v in values] == [[2, 3, 4, 5], [6, 7]]
    padded = pad_responses(values, 4)
    assert padded.tolist() == [[2, 3, 4, 5], [6, 7, 0, 0]]
    assert torch.equal(batch.responses(dense), padded)

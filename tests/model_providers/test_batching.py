import torch

from megatron_ivr.model_providers.batching import pad_responses, padding_share, plan_micro_batches, response_values
from megatron_ivr.model_providers.logprobs import ModelBatch


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


def test_one_processor_call_per_batch_encodes_what_one_call_per_prompt_encodes(tiny_models):
    """PromptCache.warm encodes a batch's distinct prompts in one padded processor call; each
    prompt's ids, token types, pixel values and grids equal those of its own call, whichever
    side the tokenizer pads (the local engine pads left), images of different sizes, a
    text-only prompt and a two-image prompt included."""
    from PIL import Image

    from megatron_ivr.model_providers.batching import PromptCache, ScoredSequence, encode_all
    from megatron_ivr.models.processor import load_processor

    processor = load_processor(tiny_models["qwen2_5_vl"])
    red, blue = Image.new("RGB", (112, 112), "red"), Image.new("RGB", (56, 112), "blue")
    small = Image.new("RGB", (56, 56))
    items = [ScoredSequence("How many red objects are there?", [red], [5, 6]),
             ScoredSequence("Hi", [], [7]),
             ScoredSequence("How many red objects are there?", [red], [8]),  # same prompt and image: one entry
             ScoredSequence("Compare the two images, please, carefully.", [blue, small], [9])]
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        counting = _CountingProcessor(processor)
        got = encode_all(PromptCache(counting), items)
        assert counting.calls == [3]  # one call, three distinct prompts
        single = PromptCache(processor)
        for item, encoded in zip(items, got):
            want = single(item.prompt, item.images)
            assert encoded.response_ids == item.response_ids
            assert encoded.prompt.ids == want.ids and encoded.prompt.mm_types == want.mm_types
            assert encoded.prompt.ids[-1] != processor.tokenizer.pad_token_id
            if item.images:
                assert torch.equal(encoded.prompt.pixel_values, want.pixel_values)
                assert torch.equal(encoded.prompt.grid, want.grid)
            else:
                assert encoded.prompt.pixel_values is None


class _CountingProcessor:
    """A processor that records how many texts each call encodes."""

    def __init__(self, processor):
        self.processor, self.calls = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        self.calls.append(len(kwargs["text"]))
        return self.processor(*args, **kwargs)

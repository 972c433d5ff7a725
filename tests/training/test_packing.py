"""Sequence packing with MRoPE (model_providers/batching.py): packed rows give the log-probs,
entropies and gradients of one sequence per row, on both model families.

The batch mixes what goes wrong in peers' packing: images of different sizes, a two-image
sample, a text-only sample, groups of responses sharing one prompt (and its image), and the
VICRA no-image copies of the same prompts, all in one layout; on Qwen2.5-VL, Qwen3-VL and
Qwen3.5 (whose Gated DeltaNet layers carry a recurrent state across a sequence). Tolerance 1e-5 absolute on
log-probs and entropies (fp32; packing only reorders sums); gradients within 1e-5 of the
largest gradient entry of each parameter.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ivr.model_providers.batching import (
    Packing,
    PromptCache,
    ScoredSequence,
    collate,
    encode,
    plan_layout,
    response_values,
    rows_of,
)
from tests.model_providers.parity_batch import parity_items

LAYOUTS = {
    "shared prompts": Packing(share_prompts=True),
    "shared prompts, groups split in rows of <= 90 tokens": Packing(share_prompts=True, unit_tokens=90),
    "rows": Packing(pack_length=160),
    "shared prompts in rows": Packing(share_prompts=True, pack_length=400),
    "everything in one row": Packing(share_prompts=True, pack_length=10_000),
    # Transformer Engine's format, here through the local spec's attention (a mask built from
    # cu_seqlens) and megatron's own THD rotary path
    "THD": Packing(pack_length=160, thd=True),
}


def mixed_items() -> list[ScoredSequence]:
    """Groups of 3 responses per prompt (same image objects), then the no-image copies."""
    with_image, without_image = parity_items()
    g = torch.Generator().manual_seed(1)
    items = []
    for item in with_image + without_image[:2]:
        for _ in range(3):
            n = int(torch.randint(1, 14, (1,), generator=g))
            items.append(ScoredSequence(item.prompt, item.images, torch.randint(20, 400, (n,), generator=g).tolist()))
    return items


@pytest.fixture(scope="module")
def parallel():
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig())
    yield
    destroy_parallel()


def _model(model_dir, dtype=torch.float32):
    from megatron_ivr.model_providers.build import build_model, load_hf_weights
    from megatron_ivr.model_providers.families import get_provider
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.models.processor import load_processor

    checkpoint = HFCheckpoint(model_dir)
    hf_config = checkpoint.config()
    model = build_model(hf_config, dtype=dtype)
    load_hf_weights(model, checkpoint)
    return model, hf_config, get_provider(hf_config.model_type), load_processor(model_dir)


def _forward(model, batch):
    """Per-response log-probs and entropies ``[N, T]`` and the gradient of a fixed weighted sum."""
    from megatron_ivr.model_providers.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
    from megatron_ivr.model_providers.qwen_vl import causal_mask

    model.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs(causal_mask))
    entropy = batch.responses(vocab_parallel_entropy(logits.detach()))
    logp = batch.responses(vocab_parallel_logprobs(logits, batch.targets))
    weights = torch.linspace(-1.0, 1.0, logp.numel()).reshape(logp.shape)
    (logp * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_packed_layouts_match_one_sequence_per_row(family, model_dirs, parallel):
    """Qwen3.5's Gated DeltaNet layers too: their recurrence and convolution restart at each
    packed sequence and every response continues from its shared prompt's final state.
    Qwen3.5 runs in fp64: in fp32 the chunked delta rule leaves the decay parameters' gradients
    (sums of nearly cancelling terms) errors of a few % of their largest entry, whatever the
    order of the tokens (measured, dt_bias of a slow head: 8.2e-8 one sequence per row, 4.0e-8
    with shared prompts, -3.1e-8 in fp64), while the log-probs agree within 1e-6."""
    dtype = torch.float64 if family == "qwen3_5" else torch.float32
    model, hf_config, provider, processor = _model(model_dirs(family), dtype)
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    pad = processor.tokenizer.pad_token_id
    reference = collate(provider, hf_config, encoded, pad)
    assert reference.attention_mask is None
    ref_logp, ref_entropy, ref_grads = _forward(model, reference)
    assert ref_logp.abs().sum() > 0 and len(ref_grads) > 10
    for name, packing in LAYOUTS.items():
        batch = collate(provider, hf_config, encoded, pad, packing=packing)
        assert batch.input_ids.shape[0] < reference.input_ids.shape[0], name  # several sequences share rows
        logp, entropy, grads = _forward(model, batch)
        assert (logp - ref_logp).abs().max() <= 1e-5, name
        assert (entropy - ref_entropy).abs().max() <= 1e-5, name
        assert grads.keys() == ref_grads.keys(), name
        for key, grad in grads.items():
            scale = ref_grads[key].abs().max().clamp_min(1e-6)
            assert (grad - ref_grads[key]).abs().max() <= 1e-5 * scale, (name, key)


def test_a_wrong_position_or_mask_is_caught(tiny_models, parallel):
    """The comparison above can fail: positions computed over the packed row instead of per
    unit (the peers' bug: 1-D counting through images and siblings) or a branch that sees its
    siblings change the log-probs by far more than the tolerance."""
    model, hf_config, provider, processor = _model(tiny_models["qwen2_5_vl"])
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    pad = processor.tokenizer.pad_token_id
    ref_logp, _, _ = _forward(model, collate(provider, hf_config, encoded, pad))
    batch = collate(provider, hf_config, encoded, pad, packing=Packing(share_prompts=True))
    shifted = collate(provider, hf_config, encoded, pad, packing=Packing(share_prompts=True))
    rows, width = shifted.input_ids.shape
    shifted.position_ids = torch.arange(width).expand(3, rows, width).clone()
    assert (_forward(model, shifted)[0] - ref_logp).abs().max() > 1e-3
    leaky = collate(provider, hf_config, encoded, pad, packing=Packing(share_prompts=True))
    dense = batch.attention_mask.dense
    leaky.attention_mask = torch.triu(torch.ones_like(dense[0, 0]), 1)[None, None].expand_as(dense).clone()
    assert (_forward(model, leaky)[0] - ref_logp).abs().max() > 1e-3


def test_thd_rows_take_each_tokens_own_mrope_angle(tiny_models, parallel):
    """THD packing (Transformer Engine's format; here megatron's THD rotary path with the
    local spec's attention): a row padded to a multiple of 64 still matches one sequence per
    row, because its padding is a sequence of its own and the boundaries end at the row's
    length (megatron's THD rotary embedding then reads each token's own MRoPE angle).
    Positions re-counted 0, 1, 2, ... in each sequence (1-D, as for text: the peers' bug with
    image tokens) and boundaries that join two sequences are both caught."""
    from megatron_ivr.model_providers.qwen_vl import thd_mask

    model, hf_config, provider, processor = _model(tiny_models["qwen2_5_vl"])
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    pad = processor.tokenizer.pad_token_id
    ref_logp, _, _ = _forward(model, collate(provider, hf_config, encoded, pad))
    packing = Packing(pack_length=160, thd=True)
    padded = collate(provider, hf_config, encoded, pad, pad_to_multiple=64, packing=packing)
    width = padded.input_ids.shape[1]
    assert padded.input_ids.shape[0] == 1 and width % 64 == 0 and int(padded.cu_seqlens[-2]) < width
    assert int(padded.cu_seqlens[-1]) == width and padded.attention_mask is None
    assert (_forward(model, padded)[0] - ref_logp).abs().max() <= 1e-5
    recounted = collate(provider, hf_config, encoded, pad, pad_to_multiple=64, packing=packing)
    bounds = recounted.cu_seqlens.tolist()
    counting = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])
    recounted.position_ids = counting.expand(3, 1, width).clone()  # 0, 1, 2, ... in every sequence
    assert (_forward(model, recounted)[0] - ref_logp).abs().max() > 1e-3
    joined = collate(provider, hf_config, encoded, pad, packing=packing)
    joined.cu_seqlens = torch.cat([joined.cu_seqlens[:1], joined.cu_seqlens[2:]])  # sequences 0 and 1 as one
    assert (_forward(model, joined)[0] - ref_logp).abs().max() > 1e-3
    # the mask the local spec builds from the boundaries: causal inside each sequence only
    mask = ~thd_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    assert mask.int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                   [0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="share_prompts"):
        Packing(share_prompts=True, thd=True)


def test_shared_prompt_layout(tiny_models):
    from megatron_ivr.model_providers.families import get_provider
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.models.processor import load_processor

    hf_config = HFCheckpoint(tiny_models["qwen2_5_vl"]).config()
    processor = load_processor(tiny_models["qwen2_5_vl"])
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    family = get_provider(hf_config.model_type)
    pad = processor.tokenizer.pad_token_id
    plain = collate(family, hf_config, encoded, pad)
    shared = collate(family, hf_config, encoded, pad, packing=Packing(share_prompts=True))
    # one row per group of 3; a group costs P - 1 + sum(1 + R_i) tokens
    assert shared.input_ids.shape[0] == len(encoded) // 3
    first = encoded[:3]
    expected = len(first[0].prompt.ids) - 1 + sum(1 + len(e.response_ids) for e in first)
    assert int(shared.extra["attention_mask"][0].sum()) == expected
    # each response's tokens and MRoPE positions read back equal the unpacked ones
    for a, b in zip(response_values(plain.input_ids, plain), response_values(shared.input_ids, shared)):
        assert a.tolist() == b.tolist()
    for dim in range(3):
        assert [v.tolist() for v in response_values(plain.position_ids[dim], plain)] == \
            [v.tolist() for v in response_values(shared.position_ids[dim], shared)]
    # the images of a group are scattered once: three times fewer image rows than unpacked
    assert shared.pixel_values.shape[0] * 3 == plain.pixel_values.shape[0]
    # a row limit splits a group into several rows, each with its own prompt copy
    limit = expected - 1
    split = collate(family, hf_config, encoded, pad, packing=Packing(share_prompts=True, unit_tokens=limit))
    assert split.input_ids.shape[0] > shared.input_ids.shape[0]
    assert int(split.extra["attention_mask"].sum(1).max()) <= max(limit, max(
        len(e.prompt.ids) + len(e.response_ids) for e in encoded))


def test_plan_layout_covers_every_sequence_once_and_splits_units_for_data_parallel(tiny_models):
    from megatron_ivr.models.processor import load_processor

    processor = load_processor(tiny_models["qwen2_5_vl"])
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    packing = Packing(share_prompts=True, pack_length=300)
    rows = rows_of(encoded, packing)
    assert sorted(i for row in rows for unit in row for i in unit) == list(range(len(encoded)))
    plan = plan_layout(encoded, packing, max_tokens=600, min_count=2)
    assert sorted(i for group in plan for i in group) == list(range(len(encoded)))
    assert len(plan) >= 2
    # a single group and four data-parallel ranks: the group's responses are split across them
    one_group = encoded[:3]
    plan = plan_layout(one_group, packing, max_tokens=10_000, min_count=3)
    assert sorted(i for group in plan for i in group) == [0, 1, 2] and len(plan) == 3


def test_transformer_engine_gets_thd_rows_and_refuses_shared_prompts(monkeypatch):
    """With TE layers, ``trainer.pack_length`` becomes THD packing and shared prompts (a mask
    TE's attention does not take) are refused by key before the model loads."""
    from megatron_ivr.config import ConfigError, load_config
    from megatron_ivr.model_providers.layout import check_packing

    trainer = load_config(None, ["trainer.share_prompts=false", "trainer.pack_length=512"]).trainer
    assert Packing.from_config(trainer, transformer_engine=True) == Packing(pack_length=512, thd=True)
    assert not Packing.from_config(trainer, transformer_engine=True).masked
    assert Packing.from_config(trainer, transformer_engine=False) == Packing(pack_length=512)
    trainer.packed_format = "thd"  # TE's layout on the local spec (how a CPU runs it)
    assert Packing.from_config(trainer, transformer_engine=False) == Packing(pack_length=512, thd=True)
    for overrides in (["trainer.packed_format=thd"], ["trainer.packed_format=thd", "trainer.share_prompts=false"],
                      ["trainer.packed_format=thd", "trainer.pack_length=512"]):
        with pytest.raises(ConfigError) as error:  # THD needs row packing of single sequences
            load_config(None, overrides)
        assert error.value.key == "trainer.packed_format"
    monkeypatch.setattr("megatron_ivr.model_providers.layout.transformer_engine_available", lambda: True)
    check_packing(load_config(None, ["trainer.share_prompts=false", "trainer.pack_length=512"]).trainer)
    with pytest.raises(ConfigError) as error:
        check_packing(load_config(None, ["trainer.share_prompts=true"]).trainer)
    assert error.value.key == "trainer.share_prompts" and "THD" in str(error.value)
    with pytest.raises(ConfigError) as error:
        check_packing(load_config(None, ["trainer.share_prompts=false", "trainer.pack_length=512",
                                         "trainer.packed_format=mask"]).trainer)
    assert error.value.key == "trainer.packed_format"


def test_fp8_rows_are_padded_to_the_token_alignment(tiny_models, parallel):
    """With FP8 the trainer pads every row to megatron's FP8 alignment (TE's FP8 GEMMs need the
    token dimension aligned); the padding changes no log-prob."""
    from megatron_ivr.config import load_config
    from megatron_ivr.model_providers.qwen_vl import token_alignment
    from megatron_ivr.training.rl import RlStep

    assert (token_alignment(None), token_alignment("delayed"), token_alignment("blockwise")) == (1, 16, 16)
    model, hf_config, provider, processor = _model(tiny_models["qwen2_5_vl"])
    assert RlStep(load_config(None, ["parallel.fp8=delayed"]), None, processor).token_alignment == 16
    assert RlStep(load_config(None, []), None, processor).token_alignment == 1
    prompts = PromptCache(processor)
    encoded = [encode(prompts, item) for item in mixed_items()]
    pad = processor.tokenizer.pad_token_id
    ref_logp, _, _ = _forward(model, collate(provider, hf_config, encoded, pad))
    for packing in (Packing(), Packing(share_prompts=True), Packing(pack_length=160, thd=True)):
        batch = collate(provider, hf_config, encoded, pad, token_alignment("delayed"), packing)
        assert batch.input_ids.shape[1] % 16 == 0
        assert (_forward(model, batch)[0] - ref_logp).abs().max() <= 1e-5

"""The in-process engine: batched sampling with images, and log-probs that equal a
teacher-forced forward pass of the same model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from megatron_ivr.prompts import chat_messages
from megatron_ivr.rollout import GenerationRequest, RolloutEngine, SamplingParams
from megatron_ivr.rollout.local import LocalEngine


def teacher_forced_logprobs(engine, request, token_ids):
    """The model's log-probs of ``token_ids`` after the prompt, in one forward pass, in the
    distribution the engine samples from: the vision placeholder tokens removed (the engine
    never samples one, so the continuation is plain text)."""
    processor = engine.processor
    text = processor.apply_chat_template(chat_messages(request.text, len(request.images)), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=request.images or None, return_tensors="pt")
    assert not set(engine.banned_token_ids.tolist()) & set(token_ids)
    targets = torch.tensor(token_ids)
    ids = torch.cat([inputs["input_ids"], targets[None]], 1)
    extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(token_ids), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits
    prompt_length = inputs["input_ids"].shape[1]
    logits = logits[0, prompt_length - 1:prompt_length - 1 + len(targets)]
    logp = logits.index_fill(-1, engine.banned_token_ids, float("-inf")).log_softmax(-1)
    return logp.gather(-1, targets[:, None])[:, 0]


def assert_logprobs_close(completion, expected, atol=1e-4):
    assert len(expected) > 0
    assert torch.allclose(torch.tensor(completion.logprobs[:len(expected)]), expected, atol=atol)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sampled_logprobs_match_a_teacher_forced_forward(tiny_models, family):
    engine = LocalEngine.from_pretrained(tiny_models[family], batch_size=3)
    assert isinstance(engine, RolloutEngine)
    requests = [GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), (200, 20, 20))]),
                GenerationRequest("Hi", []),  # text-only, left-padded in the batch
                GenerationRequest("Compare.", [Image.new("RGB", (56, 112), "blue"), Image.new("RGB", (56, 56))])]
    out = engine.generate(requests, SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=0))
    assert [len(group) for group in out] == [2, 2, 2]
    for request, group in zip(requests, out):
        for completion in group:
            assert len(completion.token_ids) == len(completion.logprobs) > 0
            assert completion.finish_reason in ("stop", "length") and completion.weight_version == 0
            assert_logprobs_close(completion, teacher_forced_logprobs(engine, request, completion.token_ids))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_shared_prefill_samples_what_separate_prefills_sample(tiny_models, family):
    """The n samples of a prompt continue from one prefill (KV cache and MRoPE offsets
    repeated): the same tokens under the same seed as n separate prefills, log-probs within
    1e-5, and equal to a teacher-forced forward (images of different sizes, a text-only
    prompt left-padded in the batch)."""
    requests = [GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), (200, 20, 20))]),
                GenerationRequest("Hi", []),
                GenerationRequest("Compare.", [Image.new("RGB", (56, 112), "blue"), Image.new("RGB", (56, 56))])]
    sampling = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=0)
    shared = LocalEngine.from_pretrained(tiny_models[family], batch_size=9)
    separate = LocalEngine.from_pretrained(tiny_models[family], batch_size=9)
    separate.share_prefill = False
    calls = []
    original = shared._shared_prefill
    shared._shared_prefill = lambda inputs, copies, cache: calls.append(copies) or original(inputs, copies, cache)
    got, want = shared.generate(requests, sampling), separate.generate(requests, sampling)
    assert calls == [3]  # one generate call, each prompt prefilled once for its 3 samples
    for request, group, reference in zip(requests, got, want):
        for completion, other in zip(group, reference):
            assert completion.token_ids == other.token_ids
            assert max(abs(a - b) for a, b in zip(completion.logprobs, other.logprobs)) <= 1e-5
            assert_logprobs_close(completion, teacher_forced_logprobs(shared, request, completion.token_ids))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_text_only_batches_after_an_image_batch(tiny_models, family):
    """A batch without any image, n > 1, after a batch with images (whose MRoPE offsets the
    model keeps): every sample's log-probs equal a teacher-forced forward, the left-padded
    short prompt included (regression: the shared prefill read the model's stale or missing
    offsets and crashed or shifted the positions)."""
    engine = LocalEngine.from_pretrained(tiny_models[family], batch_size=8)
    sampling = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=0)
    engine.generate([GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), "red")])], sampling)
    requests = [GenerationRequest("Hi", []), GenerationRequest("What is two plus three, in words, please?", [])]
    for request, group in zip(requests, engine.generate(requests, sampling)):
        for completion in group:
            assert_logprobs_close(completion, teacher_forced_logprobs(engine, request, completion.token_ids))


def test_kv_cache_writes_in_place_shares_the_prompt_and_samples_what_concatenation_samples(tiny_models,
                                                                                          monkeypatch):
    """The engine's KV cache (written in place, one copy of each prompt for its samples,
    attention over it by ``shared_prefix_attention``) gives the tokens and log-probs of
    transformers' default cache (concatenated, the prompt repeated per sample, SDPA), holds
    one prompt copy per request, and allocates its buffers a fixed number of times per
    generate call (prefill, then once for the samples' own tokens), not once per token."""
    from transformers.cache_utils import DynamicCache

    import megatron_ivr.rollout.local as local
    from megatron_ivr.rollout.kv_cache import GrowingLayer

    requests = [GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), (200, 20, 20))]),
                GenerationRequest("Hi", [])]
    sampling = SamplingParams(max_new_tokens=16, temperature=1.0, n=2, seed=0)
    engine = LocalEngine.from_pretrained(tiny_models["qwen2_5_vl"], batch_size=4)
    assert engine.shares_prompt_kv
    allocations, caches = [], []
    reserve = GrowingLayer._reserve
    monkeypatch.setattr(GrowingLayer, "_reserve", lambda self, *a: allocations.append(1) or reserve(self, *a))
    growing = local.growing_cache
    monkeypatch.setattr(local, "growing_cache", lambda *a, **k: caches.append(growing(*a, **k)) or caches[-1])
    got = engine.generate(requests, sampling)
    layers = engine.model.config.get_text_config().num_hidden_layers
    assert len(allocations) == 2 * 2 * layers  # keys and values, per layer: prefill + the samples' own tokens
    prompt_length = engine.processor(text=[local.chat_prompt(engine.processor, requests[0].text, 1)],
                                     images=requests[0].images, return_tensors="pt")["input_ids"].shape[1]
    for layer in caches[0].layers:  # 2 prompts x 2 samples: 2 prompt copies (all but the last token), 4 suffixes
        assert layer.prefix_keys.shape[0] == 2 and layer.prefix_length == prompt_length - 1
        assert layer.keys.shape[0] == 4 and layer.get_seq_length() == prompt_length - 1 + layer.keys.shape[-2]
    monkeypatch.setattr(local, "growing_cache", lambda *a, **k: DynamicCache())
    want = engine.generate(requests, sampling)
    for group, reference in zip(got, want):
        for completion, other in zip(group, reference):
            assert completion.token_ids == other.token_ids and len(completion.token_ids) > 1
            assert max(abs(a - b) for a, b in zip(completion.logprobs, other.logprobs)) <= 1e-6


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_decode_loop_samples_what_transformers_generate_samples(tiny_models, family):
    """The engine's own decode loop (shared prefill, shared-prompt cache, explicit MRoPE
    positions) gives the tokens of transformers' ``generate`` on the same rows (one prefill per
    row, its default cache and positions), greedy and sampled under the same seed, and their
    log-probs within 1e-5: images of different sizes, a text-only prompt left-padded in the
    batch. Both suppress the vision placeholder tokens (which a random model samples)."""
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    from megatron_ivr.prompts import chat_prompt
    from megatron_ivr.rollout.local import _sampler

    engine = LocalEngine.from_pretrained(tiny_models[family], batch_size=6)
    requests = [GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), (200, 20, 20))]),
                GenerationRequest("Hi", []),
                GenerationRequest("Compare.", [Image.new("RGB", (56, 112), "blue"), Image.new("RGB", (56, 56))])]
    for sampling in (SamplingParams(max_new_tokens=12, temperature=0.0),
                     SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, n=2, seed=3)):
        got = [c for group in engine.generate(requests, sampling) for c in group]
        rows = [r for r in requests for _ in range(sampling.n)]
        inputs = engine.processor(text=[chat_prompt(engine.processor, r.text, len(r.images)) for r in rows],
                                  images=[image for r in rows for image in r.images], return_tensors="pt",
                                  padding=True)
        torch.manual_seed(sampling.seed or 0)
        with torch.inference_mode():
            suppress = SuppressTokensLogitsProcessor(engine.banned_token_ids.tolist())
            out = engine.model.generate(**inputs, do_sample=False,
                                        logits_processor=LogitsProcessorList([suppress, *_sampler(sampling)]),
                                        max_new_tokens=sampling.max_new_tokens, pad_token_id=engine.pad_token_id,
                                        eos_token_id=engine.eos_token_id, output_logits=True,
                                        return_dict_in_generate=True)
        tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        # the log-probs of the distribution sampled from (before top-p): logits / T without the vision
        # tokens, raw when greedy
        scale = sampling.temperature or 1.0
        logits = torch.stack(out.logits, 1).float().index_fill(-1, engine.banned_token_ids, float("-inf"))
        logprobs = (logits / scale).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        for completion, row, row_logprobs in zip(got, tokens.tolist(), logprobs):
            want = row[:row.index(engine.eos_token_id) + 1] if engine.eos_token_id in row else row
            assert completion.token_ids == want
            assert torch.allclose(torch.tensor(completion.logprobs), row_logprobs[:len(want)], atol=1e-5)
        assert any(len(c.token_ids) > 1 for c in got)


def test_sampling_follows_the_warped_distribution():
    """The exponential race samples from softmax(logits / T) after top-k and top-p: token
    frequencies over 40,000 draws within 0.01 of the probabilities; filtered tokens never."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from megatron_ivr.rollout.local import _sampler

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(40_000, 1)
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
                   SamplingParams(temperature=1.3, top_k=3)):
        processors = _sampler(params)
        picks = processors(None, logits.clone()).argmax(-1)
        warped = logits[:1] / params.temperature
        if params.top_k > 0:
            warped[0, params.top_k:] = float("-inf")
        if params.top_p < 1:
            warped = TopPLogitsWarper(params.top_p)(None, warped)
        expected = warped.softmax(-1)[0]
        frequencies = torch.bincount(picks, minlength=6).double() / len(picks)
        assert torch.allclose(frequencies, expected.double(), atol=0.01), (params, frequencies, expected)
        assert frequencies[expected == 0].sum() == 0
    assert len(_sampler(SamplingParams(temperature=0.0))) == 0


def test_greedy_is_deterministic_and_update_weights_checks_names(tiny_models):
    engine = LocalEngine.from_pretrained(tiny_models["qwen2_5_vl"])
    request = [GenerationRequest("How many?", [Image.new("RGB", (112, 112), "red")])]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    first = engine.generate(request, greedy)[0][0]
    assert engine.generate(request, greedy)[0][0].token_ids == first.token_ids
    name, param = next(iter(engine.model.named_parameters()))
    engine.update_weights([(name, param.detach() * 0.5)], version=7)
    assert engine.weight_version == 7 and engine.generate(request, greedy)[0][0].weight_version == 7
    with pytest.raises(KeyError, match="unknown parameter"):
        engine.update_weights([("model.no_such.weight", torch.zeros(1))], version=8)


def test_stale_samples_are_rejected_beyond_the_lag():
    from megatron_ivr.rollout.engine import Completion, reject_stale

    def completion(version):
        return Completion("x", [1], [-0.1], "stop", version)

    groups = [[completion(5), completion(4), completion(3)], [completion(2)]]
    kept, rejected = reject_stale(groups, current_version=5, max_lag=1)
    assert [[c.weight_version for c in g] for g in kept] == [[5, 4], []] and rejected == 2
    assert reject_stale(groups, current_version=5, max_lag=0)[1] == 3

"""Integration tier: a real SGLang 0.5.23 server on this CPU machine serving the tiny
Qwen2.5-VL (environment: tests/harness/sglang_cpu/setup_env.sh; skipped, with the reason,
when it is absent). Shows: generation with images equal to transformers; a weight push
from Megatron at TP2 changes the server exactly as loading the same weights in
transformers does (language and vision); the weight version in responses; a server killed
during a batch loses no sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

from megatron_ivr.bridge.verify import probe_image
from megatron_ivr.model_providers.parallel import free_port
from megatron_ivr.models.processor import load_processor
from megatron_ivr.models.tiny import load_model
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.prompts import chat_messages
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.sglang.client import SGLangClient
from megatron_ivr.rollout.sglang.engine import SGLangEngine
from megatron_ivr.rollout.sglang.server import ServerManager, ServerSpec, free_server_port
from tests.sglang_tier import MARKS, PYTHON

pytestmark = MARKS


scene = probe_image  # the bridge's probe scene: two coloured squares

@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    log = tmp_path_factory.mktemp("sglang") / "server.log"
    spec = ServerSpec(model_path=str(tiny_models["qwen2_5_vl"]), port=free_server_port(), python=PYTHON,
                      log_path=str(log))
    manager = ServerManager([spec], startup_timeout_s=600).start()
    yield manager
    manager.shutdown()


def banned_ids(path):
    return vision_token_ids(load_processor(path).tokenizer)


def hf_greedy(path, image, max_new_tokens=12):
    """transformers' greedy continuation and its log-probs, in the engines' distribution: the
    vision placeholder tokens removed (a random tiny model gives them about 1% of the mass)."""
    processor, model = load_processor(path), load_model(path).eval()
    text = processor.apply_chat_template(chat_messages("How many objects?", 1), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    banned = banned_ids(path)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True,
                             logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor(banned)]))
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    logits = torch.stack(out.logits, 1)[0].float().index_fill(-1, torch.tensor(banned), float("-inf"))
    logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), logprobs


def server_greedy(engine, image, max_new_tokens=12):
    return engine.generate([GenerationRequest("How many objects?", [image], "probe")],
                           SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))[0][0]


def engine_for(server, path, mask_vision_tokens=True, **kwargs):
    """An engine as the trainer makes it: the vision placeholder tokens masked (an unmasked one
    can sample ``<|image_pad|>`` from a random tiny model, and then no teacher-forced forward of
    the response is possible: the verl #7038 failure)."""
    return SGLangEngine(SGLangClient(server.urls, **kwargs), load_processor(path).tokenizer,
                        mask_vision_tokens=mask_vision_tokens)


def test_generation_with_images_matches_transformers(server, tiny_models):
    path = tiny_models["qwen2_5_vl"]
    engine = engine_for(server, path)
    completion = server_greedy(engine, scene())
    tokens, logprobs = hf_greedy(path, scene())
    engine.client.close()
    assert completion.token_ids == tokens[:len(completion.token_ids)] and len(completion.token_ids) > 0
    assert (torch.tensor(completion.logprobs) - logprobs[:len(completion.logprobs)]).abs().max() <= 1e-4


def tempered_logprobs(path, image, token_ids, temperature, banned=()):
    """log softmax(logits / T) over the whole vocabulary (without ``banned``) at each of
    ``token_ids``, teacher-forced in transformers after the probe question's prompt:
    [len(token_ids), vocab]."""
    processor, model = load_processor(path), load_model(path).eval()
    text = processor.apply_chat_template(chat_messages("How many objects?", 1), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    continuation = torch.tensor([token_ids])
    for key in ("attention_mask", "mm_token_type_ids"):  # per-token inputs: the continuation is text
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.full_like(continuation, int(key == "attention_mask"))], 1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt_length - 1:-1].float()
    if banned:
        logits = logits.index_fill(-1, torch.tensor(list(banned)), float("-inf"))
    return (logits / temperature).log_softmax(-1)


def test_sampled_logprobs_are_of_the_tempered_distribution_before_top_p(server, tiny_models):
    """At T = 0.8 and top_p = 0.5 the server reports log softmax(logits / T) of each sampled
    token over the whole vocabulary less the vision tokens (SGLANG_RETURN_ORIGINAL_LOGPROB=0,
    which the server manager pins), not renormalized over the top-p set: the same distribution the local engine
    reports and the trainer scores, so the TIS weight compares like with like."""
    path = tiny_models["qwen2_5_vl"]
    engine = engine_for(server, path)
    completion = engine.generate([GenerationRequest("How many objects?", [scene()], "top-p")],
                                 SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.5, seed=3))[0][0]
    engine.client.close()
    assert len(completion.token_ids) >= 4
    full = tempered_logprobs(path, scene(), completion.token_ids, 0.8, banned_ids(path))
    got = torch.tensor(completion.logprobs)
    taken = full.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    assert (got - taken).abs().max() <= 1e-4
    # the top-p set: the most likely tokens up to the one whose cumulative mass first reaches 0.5
    probs = full.exp().sort(-1, descending=True).values
    nucleus_mass = (probs * ((probs.cumsum(-1) - probs) < 0.5)).sum(-1)
    assert (got - (taken - nucleus_mass.log())).abs().max() > 1e-2  # renormalized log-probs would differ


def test_the_server_removes_vision_tokens_from_sampling(server, tiny_models):
    """With the mask (the default), every request's logit_bias removes the vision placeholders:
    the reported log-prob of each sampled token is the full-vocabulary one renormalized
    without them, log p - log(1 - p_vision), which on a random tiny model (p_vision ~ 1e-2)
    is measurably different from log p. So the server applied exactly that mask."""
    path = tiny_models["qwen2_5_vl"]
    engine = engine_for(server, path)
    completion = engine.generate([GenerationRequest("How many objects?", [scene()], "masked")],
                                 SamplingParams(max_new_tokens=16, temperature=1.0, seed=5))[0][0]
    engine.client.close()
    banned = banned_ids(path)
    assert len(completion.token_ids) >= 4 and not set(banned) & set(completion.token_ids)
    full = tempered_logprobs(path, scene(), completion.token_ids, 1.0)
    taken = full.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    p_vision = full[:, banned].exp().sum(-1)
    got = torch.tensor(completion.logprobs)
    assert (got - (taken - torch.log1p(-p_vision))).abs().max() <= 1e-4
    assert (got - taken).abs().max() > 1e-3  # without the mask they would be equal


@pytest.mark.parametrize("transport, version, layout", [
    ("tensor", 7, ("2", "1")), ("distributed", 8, ("2", "1")),
    ("distributed_per_stage", 9, ("1", "2")),  # two pipeline stages, each broadcasting its own layers
])
def test_weight_push_from_megatron_changes_language_and_vision(server, tiny_models, tmp_path, transport, version,
                                                               layout):
    path = tiny_models["qwen2_5_vl"]
    engine = engine_for(server, path)
    before = server_greedy(engine, scene())  # the image is seen before the update (the cache trap)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(Path(__file__).with_name("push_worker.py")), str(path), server.urls[0],
               str(tmp_path), transport, str(version), *layout]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((tmp_path / "report.json").read_text())
    # the bridge's own probe: the server's log-probs equal the Megatron model's after the push
    assert report["weight_sync/verified"] == 1 and report["probe_max_diff"] <= 1e-4
    assert report["weight_sync/tensors"] == 57 and report["weight_sync/buckets"] > 1
    after = server_greedy(engine, scene())
    engine.client.close()
    tokens, logprobs = hf_greedy(tmp_path / "pushed", scene())
    assert after.weight_version == version and before.weight_version != version
    assert after.token_ids == tokens[:len(after.token_ids)]
    assert (torch.tensor(after.logprobs) - logprobs[:len(after.logprobs)]).abs().max() <= 1e-4
    assert after.logprobs != before.logprobs
    # the vision tower took effect: transformers with the pushed language weights but the
    # original vision tower would answer differently from what the server answers
    mixed = load_model(tmp_path / "pushed")
    original = load_model(path)
    with torch.no_grad():
        mixed.model.visual.load_state_dict(original.model.visual.state_dict())
    mixed.save_pretrained(tmp_path / "language_only")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (tmp_path / "language_only" / name).write_bytes((Path(path) / name).read_bytes())
    _, language_only = hf_greedy(tmp_path / "language_only", scene())
    n = len(after.logprobs)
    assert (torch.tensor(after.logprobs) - language_only[:n]).abs().max() > 1e-3


def test_killed_server_loses_no_sample(server, tiny_models):
    engine = engine_for(server, tiny_models["qwen2_5_vl"], retries=40, cool_off_s=5.0, timeout_s=120)
    requests = [GenerationRequest(f"Question {i}?", [scene()] if i % 2 else [], f"s{i}") for i in range(16)]
    results = {}
    payload = engine.payload

    def full_length_payload(*args):
        # Every sample runs to max_new_tokens, so the batch outlasts the kill however early the
        # policy (here the weights an earlier test pushed) would emit EOS. CI once saw the whole
        # batch end within 1.5 s.
        body = payload(*args)
        body["sampling_params"]["ignore_eos"] = True
        return body

    engine.payload = full_length_payload

    def run_batch():
        results["out"] = engine.generate(requests, SamplingParams(max_new_tokens=256, temperature=1.0, n=2))

    worker = threading.Thread(target=run_batch)
    worker.start()
    deadline = time.monotonic() + 60
    while engine.client.stats.requests < 32 and time.monotonic() < deadline:  # every sample is in flight
        time.sleep(0.05)
    time.sleep(0.5)
    assert worker.is_alive(), "the batch ended before the kill: make it longer"
    server.kill(0)
    assert server.restart_dead() == 1  # the manager brings it back; the client retries meanwhile
    worker.join(timeout=900)
    engine.client.close()
    out = results["out"]
    assert [len(group) for group in out] == [2] * 16
    assert all(len(c.token_ids) == 256 and len(c.logprobs) == 256 for group in out for c in group)
    assert engine.client.stats.retries >= 1


def _push(client, named_tensors, version):
    """A weight update as the bridge sends it in async mode: the servers paused in ``abort``
    mode (what is in flight comes back partial), the tensors, the version, continue."""
    from megatron_ivr.bridge.buckets import bucketize
    from megatron_ivr.bridge.transports import TensorTransport

    transport = TensorTransport(client, pause_mode="abort")
    transport.begin(version)
    for bucket in bucketize(iter(named_tensors), 64 * 1024**2):
        transport.send(bucket)
    transport.finish(version)


def _scored(model, processor, image, token_ids, banned):
    """log softmax(logits) without the vision tokens at each of ``token_ids``, teacher-forced
    after the probe question's prompt (temperature 1)."""
    text = processor.apply_chat_template(chat_messages("How many objects?", 1), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    continuation = torch.tensor([token_ids])
    for key in ("attention_mask", "mm_token_type_ids"):
        if key in inputs:
            inputs[key] = torch.cat([inputs[key], torch.full_like(continuation, int(key == "attention_mask"))], 1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], continuation], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, start - 1:-1].float()
    logp = logits.index_fill(-1, torch.tensor(list(banned)), float("-inf")).log_softmax(-1)
    return logp.gather(-1, continuation[0][:, None])[:, 0]


LONG = 1024  # tokens per response in the partial-rollout test


def test_partial_rollouts_continue_on_the_pushed_weights(server, tiny_models):
    """A weight push while the server generates (async mode): the in-flight requests are
    aborted, continued from their partial responses on the new weights (rollout/partial.py), and
    each token's log-prob is the one of the weights that sampled it: those before the push equal
    transformers' scoring under the old weights, those after it under the new, within 1e-4."""
    from safetensors.torch import load_file

    from megatron_ivr.rollout.partial import ContinuingEngine

    path = tiny_models["qwen2_5_vl"]
    old = load_file(str(Path(path) / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    new_head = old["lm_head.weight"] + 0.05 * torch.randn(old["lm_head.weight"].shape, generator=generator)
    engine = engine_for(server, path)
    _push(engine.client, old.items(), 20)  # the checkpoint's weights, whatever earlier tests pushed
    payload = engine.payload

    def full_length_payload(*args):  # long enough for the push to land mid-generation
        body = payload(*args)
        body["sampling_params"]["ignore_eos"] = True
        return body

    engine.payload = full_length_payload
    continuing = ContinuingEngine(engine)
    requests = [GenerationRequest("How many objects?", [scene()], f"partial{i}") for i in range(4)]
    results = {}
    # 1,024 tokens each: an idle CI machine generated 4 x 192 before a push 0.5 s in (seen)
    worker = threading.Thread(target=lambda: results.update(out=continuing.generate(
        requests, SamplingParams(max_new_tokens=LONG, temperature=1.0, seed=11))))
    worker.start()
    deadline = time.monotonic() + 60
    while engine.client.stats.requests < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert worker.is_alive(), "the generation ended before the push: make it longer"
    _push(engine.client, [("lm_head.weight", new_head)], 21)
    worker.join(timeout=600)
    engine.client.close()
    completions = [group[0] for group in results["out"]]
    assert continuing.take_counts()["rollout/interrupted"] >= 1
    processor, banned = load_processor(path), banned_ids(path)
    old_model, new_model = load_model(path).eval(), load_model(path).eval()
    with torch.no_grad():
        new_model.lm_head.weight.copy_(new_head)
    both = 0
    for completion in completions:
        versions = completion.versions()
        assert len(versions) == len(completion.token_ids) == len(completion.logprobs) == LONG
        assert set(versions) <= {20, 21} and versions == sorted(versions) and completion.finish_reason == "length"
        switch = versions.index(21) if 21 in versions else len(versions)
        both += 0 < switch < len(versions)
        got = torch.tensor(completion.logprobs)
        old_scores = _scored(old_model, processor, scene(), completion.token_ids, banned)
        new_scores = _scored(new_model, processor, scene(), completion.token_ids, banned)
        assert torch.allclose(got[:switch], old_scores[:switch], rtol=0, atol=1e-4)
        assert torch.allclose(got[switch:], new_scores[switch:], rtol=0, atol=1e-4)
        if switch < len(versions):  # and the two policies are told apart there
            assert (got[switch:] - old_scores[switch:]).abs().max().item() > 1e-3
    assert both >= 1  # at least one response holds tokens of both versions

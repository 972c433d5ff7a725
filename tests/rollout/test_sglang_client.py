"""The SGLang client and engine against a local server speaking SGLang's JSON (unit tier;
tests/rollout/test_sglang_server.py runs the real server)."""

from __future__ import annotations

import base64
import pickle

import pytest
import torch
from PIL import Image

from megatron_ivr.bridge.buckets import flatten
from megatron_ivr.bridge.transports import TensorTransport
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.sglang.client import SGLangClient, SGLangError
from megatron_ivr.rollout.sglang.engine import SGLangEngine
from tests.rollout.fake_sglang import FakeSGLang


class Tokenizer:
    def get_vocab(self):  # Qwen's ids of the vision placeholders, and two ordinary tokens
        return {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                "<|image_pad|>": 151655, "<|video_pad|>": 151656, "a": 64, "<|box_start|>": 151648}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        content = messages[0]["content"]
        pads = "".join("<|vision_start|><|image_pad|><|vision_end|>" for c in content if c["type"] == "image")
        return f"<|im_start|>user\n{pads}{content[-1]['text']}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def servers():
    fakes = [FakeSGLang(api_key="secret").start() for _ in range(2)]
    yield fakes
    for fake in fakes:
        fake.stop()


def test_generate_spreads_requests_and_parses_results(servers):
    client = SGLangClient([s.url for s in servers], api_key="secret", max_concurrency=4)
    engine = SGLangEngine(client, Tokenizer())
    image = Image.new("RGB", (28, 28), "red")
    out = engine.generate([GenerationRequest("How many?", [image], "q0"), GenerationRequest("Hi", [], "q1")],
                          SamplingParams(max_new_tokens=3, n=3, temperature=1.0, seed=7))
    client.close()
    assert [len(group) for group in out] == [3, 3]
    completion = out[0][0]
    assert completion.token_ids == [10, 11, 12] and completion.logprobs == [-0.5] * 3
    assert completion.finish_reason == "length" and completion.weight_version == 0
    generate = [body for s in servers for path, body in s.requests if path == "/generate"]
    assert len(generate) == 6 and all(len(s.requests) > 0 for s in servers)  # both servers used
    first = next(b for b in generate if b["rid"].startswith("q0-"))
    assert first["image_data"][0].startswith("data:image/png;base64,")
    # every request removes the vision placeholders from sampling, and only them
    assert all(b["sampling_params"]["logit_bias"] == {str(i): -1.0e9 for i in range(151652, 151657)}
               for b in generate)
    assert first["text"].count("<|image_pad|>") == 1 and first["return_logprob"] is True
    assert len({b["rid"] for b in generate}) == 6  # every sample its own request id
    assert sorted(b["sampling_params"]["sampling_seed"] for b in generate) == [7, 7, 8, 8, 9, 9]


def test_failed_server_is_retried_elsewhere_without_losing_samples(servers):
    servers[0].fail_generate = 100  # this server answers 500 to everything
    client = SGLangClient([s.url for s in servers], api_key="secret", retries=2, cool_off_s=60)
    results = client.generate([{"text": f"p{i}", "sampling_params": {"max_new_tokens": 1}, "rid": f"r{i}"}
                               for i in range(8)])
    client.close()
    assert [r["meta_info"]["id"] for r in results] == [f"r{i}" for i in range(8)]  # none lost, in order
    served = [b["rid"] for path, b in servers[1].requests if path == "/generate"]
    assert sorted(served) == [f"r{i}" for i in range(8)]  # each answered exactly once
    assert client.stats.retries >= 1


def test_all_servers_down_is_a_clear_error(servers):
    for s in servers:
        s.fail_generate = 100
    client = SGLangClient([s.url for s in servers], api_key="secret", retries=1, cool_off_s=0.01)
    with pytest.raises(SGLangError, match="failed after 2 attempts"):
        client.generate([{"text": "p", "sampling_params": {"max_new_tokens": 1}}])
    client.close()


def test_timeout_and_api_key(servers):
    servers[0].hang_generate = True
    client = SGLangClient([servers[0].url], api_key="secret", timeout_s=0.5, retries=0)
    with pytest.raises(SGLangError):
        client.generate([{"text": "p", "sampling_params": {"max_new_tokens": 1}}])
    client.close()
    wrong = SGLangClient([servers[1].url], api_key="wrong", retries=0)
    with pytest.raises(SGLangError, match="HTTP 401"):
        wrong.generate([{"text": "p", "sampling_params": {"max_new_tokens": 1}}])
    wrong.close()


def test_tensor_transport_wraps_updates_and_sets_the_version(servers):
    client = SGLangClient([s.url for s in servers], api_key="secret")
    transport = TensorTransport(client)
    with pytest.raises(SGLangError, match="HTTP 400"):  # outside begin/end SGLang refuses
        transport.send(flatten([("w", torch.ones(2))]))
    transport.begin(version=3)
    transport.send(flatten([("model.norm.weight", torch.arange(4.0)), ("lm_head.weight", torch.ones(2, 2))]))
    transport.finish(version=3)
    client.close()
    for server in servers:
        assert [p for p, _ in server.requests] == [
            "/update_weights_from_tensor",  # the refused one
            "/pause_generation", "/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update",
            "/update_weight_version", "/flush_cache", "/continue_generation"]
    body = servers[1].requests[3][1]
    payload = pickle.loads(base64.b64decode(body["serialized_named_tensors"][0]))
    assert body["load_format"] == "flattened_bucket" and payload["flattened_tensor"].dtype == torch.uint8
    assert [m.name for m in payload["metadata"]] == ["model.norm.weight", "lm_head.weight"]
    assert all(s.version == "3" for s in servers)


def test_a_lost_server_is_retired_and_the_push_goes_on(servers):
    """A server whose process died (here: stopped) during a run: the weight push reaches the
    others and the run goes on; the lost one gets no more requests (it would come back with its
    checkpoint's weights), so generation does not even retry it. The last server lost is an error."""
    client = SGLangClient([s.url for s in servers], api_key="secret", retries=2)
    servers[0].stop()
    transport = TensorTransport(client, pause_mode="abort")
    transport.begin(version=4)
    transport.send(flatten([("lm_head.weight", torch.ones(2, 2))]))
    transport.finish(version=4)
    assert client.stats.retired == [servers[0].url] and servers[1].version == "4"
    assert [p for p, _ in servers[1].requests] == [
        "/pause_generation", "/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update",
        "/update_weight_version", "/flush_cache", "/continue_generation"]
    assert servers[1].requests[0][1] == {"mode": "abort"}  # async: in-flight requests come back partial
    results = client.generate([{"text": f"p{i}", "sampling_params": {"max_new_tokens": 1}, "rid": f"r{i}"}
                               for i in range(6)])
    assert len(results) == 6 and client.stats.requests == 6 and client.stats.retries == 0
    servers[1].stop()
    with pytest.raises(SGLangError):
        client.call_all("/flush_cache", {})  # the last one is never retired: the run stops with the reason
    client.close()
    servers.clear()  # both stopped already


def test_router_takes_generation_and_workers_take_admin_calls(servers):
    router = FakeSGLang(api_key="secret").start()
    try:
        client = SGLangClient([s.url for s in servers], api_key="secret", router_url=router.url)
        client.generate([{"text": f"p{i}", "sampling_params": {"max_new_tokens": 1}} for i in range(4)])
        client.call_all("/flush_cache", {})
        client.close()
    finally:
        router.stop()
    assert [p for p, _ in router.requests] == ["/generate"] * 4
    assert all([p for p, _ in s.requests] == ["/flush_cache"] for s in servers)


@pytest.mark.parametrize("device, expected", [("cuda", ["/release_memory_occupation", "/resume_memory_occupation"]),
                                              ("cpu", [])])
def test_memory_release_goes_to_gpu_servers_only(servers, device, expected):
    """Colocated runs free the servers' memory while training; SGLang's CPU engine crashes on
    that call (measured with 0.5.23), so CPU servers are asked once and then left alone."""
    for server in servers:
        server.device = device
    engine = SGLangEngine(SGLangClient([s.url for s in servers], api_key="secret"), tokenizer=None,
                          mask_vision_tokens=False)
    for _ in range(2):
        engine.release_memory()
        engine.resume_memory()
    engine.client.close()
    for server in servers:
        paths = [path for path, _ in server.requests]
        assert paths == expected * 2

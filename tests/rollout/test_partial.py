"""Partial rollouts on the in-process engine (rollout/partial.py): a weight push while another
thread generates aborts the generation; the response continues on the new weights, carries
the version of every token, and each token's log-prob is the one of the policy that sampled
it (the old weights before the push, the new after), exactly as a teacher-forced forward of
each policy scores them. The same on SGLang servers: tests/rollout/test_sglang_server.py."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.local import LocalEngine
from megatron_ivr.rollout.partial import ContinuingEngine, GenerationStopped
from tests.rollout.test_local_engine import teacher_forced_logprobs

ABORT_AFTER = 6  # decode forwards before the push lands


def _push_during_generation(engine: LocalEngine, new_state: dict, version: int):
    """Start the push (pause, load, resume) from another thread once the engine has run
    ``ABORT_AFTER`` forwards; the generating thread waits at that forward until the pause has
    reached it, so the abort lands at a known token."""
    forwards = {"n": 0}
    reached = threading.Event()
    original = engine.model.forward

    def counting_forward(*args, **kwargs):
        forwards["n"] += 1
        if forwards["n"] == ABORT_AFTER:
            reached.set()
            assert engine._abort.wait(timeout=30)
        return original(*args, **kwargs)

    engine.model.forward = counting_forward

    def push():
        reached.wait(timeout=60)
        engine.pause("abort")
        engine.update_weights(new_state.items(), version)
        engine.set_weight_version(version)
        engine.resume()

    pusher = threading.Thread(target=push)
    pusher.start()
    return pusher, original


def test_a_push_mid_generation_continues_on_the_new_weights(tiny_models):
    path = tiny_models["qwen2_5_vl"]
    engine = LocalEngine.from_pretrained(path, batch_size=4)
    old = {name: p.detach().clone() for name, p in engine.model.named_parameters()}
    torch.manual_seed(0)
    new = {name: p + 0.02 * torch.randn_like(p) for name, p in old.items()}
    requests = [GenerationRequest("How many red objects?", [Image.new("RGB", (112, 112), (200, 20, 20))], "a"),
                GenerationRequest("Hi", [], "b")]
    sampling = SamplingParams(max_new_tokens=24, temperature=1.0, n=2, seed=1)
    continuing = ContinuingEngine(engine)
    pusher, original_forward = _push_during_generation(engine, new, version=1)
    out = continuing.generate(requests, sampling)
    pusher.join()
    engine.model.forward = original_forward
    assert continuing.take_counts()["rollout/interrupted"] >= 1
    partial = [c for group in out for c in group if len(set(c.versions())) == 2]
    assert partial, "no response holds tokens of both versions"
    for request, group in zip(requests, out):
        for completion in group:
            versions = completion.versions()
            assert completion.finish_reason in ("stop", "length")
            assert len(versions) == len(completion.token_ids) == len(completion.logprobs)
            assert versions == sorted(versions) and completion.weight_version == versions[0] == 0
            switch = versions.index(1) if 1 in versions else len(versions)
            assert switch == ABORT_AFTER - 1 or 1 not in versions  # the prompt's forward, then one per token
            got = torch.tensor(completion.logprobs)
            for state, span in ((old, slice(0, switch)), (new, slice(switch, None))):
                with torch.no_grad():
                    for name, p in engine.model.named_parameters():
                        p.copy_(state[name])
                expected = teacher_forced_logprobs(engine, request, completion.token_ids)
                assert torch.allclose(got[span], expected[span], atol=1e-5), (state is old, span)
            assert completion.text == engine.processor.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_a_stopped_wrapper_does_not_continue(tiny_models):
    engine = LocalEngine.from_pretrained(tiny_models["qwen2_5_vl"])
    continuing = ContinuingEngine(engine)
    continuing.stopped = True
    with pytest.raises(GenerationStopped):
        continuing.generate([GenerationRequest("Hi", [])], SamplingParams(max_new_tokens=4))
    engine.pause()  # nothing generating: immediate, and it holds the engine until resume
    assert engine._paused and engine._abort.is_set()
    engine.resume()
    assert not engine._paused and not engine._abort.is_set()
    completion = engine.generate([GenerationRequest("Hi", [])], SamplingParams(max_new_tokens=4, seed=0))[0][0]
    assert completion.finish_reason in ("stop", "length") and completion.token_versions is None

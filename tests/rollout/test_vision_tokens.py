"""Vision placeholder tokens are never sampled into a response (verl #7038: one makes the
trainer's image-token count disagree with the image features, a crash hours into a run). A
policy biased to sample ``<|image_pad|>`` (a hook adds +50 to its logit): the local engine
masks every vision token; with the mask off, the trainer's experience maker refuses each such
response, counts it in the metrics and carries on."""

from __future__ import annotations

import pytest
import torch

from megatron_ivr.config import load_config
from megatron_ivr.data import ImageRules, read_dataset
from megatron_ivr.models.tokenizer import VISION_TOKENS, vision_token_ids
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.local import LocalEngine
from megatron_ivr.training.experience import ExperienceMaker, refuse_vision_tokens


def _biased_engine(model_dir):
    engine = LocalEngine.from_pretrained(model_dir, batch_size=8)
    image_pad = engine.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def push_image_pad(module, inputs, logits):
        logits[..., image_pad] += 50.0
        return logits

    engine.model.lm_head.register_forward_hook(push_image_pad)
    return engine, image_pad


def test_vision_token_ids_cover_the_placeholders(tiny_models):
    engine = LocalEngine.from_pretrained(tiny_models["qwen2_5_vl"])
    ids = vision_token_ids(engine.processor.tokenizer)
    assert len(ids) == len(VISION_TOKENS)
    assert set(engine.processor.tokenizer.convert_ids_to_tokens(ids)) == set(VISION_TOKENS)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_the_local_engine_never_samples_a_vision_token(tiny_models, synthetic_dir, temperature):
    engine, image_pad = _biased_engine(tiny_models["qwen2_5_vl"])
    sample = read_dataset(synthetic_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=1).samples[0]
    request = GenerationRequest("How many objects?", sample.images, "q")
    banned = set(vision_token_ids(engine.processor.tokenizer))
    out = engine.generate([request], SamplingParams(max_new_tokens=12, temperature=temperature, n=4, seed=0))
    tokens = [t for completion in out[0] for t in completion.token_ids]
    assert tokens and not banned & set(tokens)
    engine.banned_token_ids = torch.tensor([], dtype=torch.long)  # the mask off: the bias wins
    out = engine.generate([request], SamplingParams(max_new_tokens=4, temperature=temperature, n=2, seed=0))
    assert all(image_pad in completion.token_ids for completion in out[0])


def test_the_trainer_refuses_responses_with_vision_tokens(tiny_models, synthetic_dir):
    cfg = load_config(None, ["rollout.n=4", "rollout.max_new_tokens=6", "trainer.prompts_per_step=2"])
    engine, image_pad = _biased_engine(tiny_models["qwen2_5_vl"])
    engine.banned_token_ids = torch.tensor([], dtype=torch.long)  # an engine without the mask
    samples = read_dataset(synthetic_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=4).samples
    with RewardFunction(cfg.reward) as reward_fn:
        maker = ExperienceMaker(cfg, engine, reward_fn, samples, vision_token_ids(engine.processor.tokenizer))
        experience = maker.make(step=1)
    assert experience.metrics["rollout/vision_token_refused"] == 8  # every response: reported, not trained
    assert experience.trajectories == [] and experience.metrics["rollout/responses"] == 0


def test_refuse_vision_tokens_keeps_the_clean_responses():
    groups = [[[1, 2], [3, 99]], [[99]], [[4]]]
    kept, refused = refuse_vision_tokens(groups, frozenset({99}), token_ids=lambda ids: ids)
    assert kept == [[[1, 2]], [], [[4]]] and refused == 2

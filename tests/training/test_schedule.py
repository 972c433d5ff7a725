"""The experience schedule (training/schedule.py) with the real experience maker, engine and
reward function: the next step's experience is made on a generator thread, a checkpoint holds
it exactly, and a failure there stops the trainer with that error."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest


@pytest.fixture(scope="module")
def parts(tiny_models, synthetic_dir):
    from megatron_ivr.config import load_config
    from megatron_ivr.data import ImageRules, read_dataset
    from megatron_ivr.models.processor import load_processor
    from megatron_ivr.models.tokenizer import vision_token_ids
    from megatron_ivr.rewards import RewardFunction
    from megatron_ivr.rollout.local import LocalEngine
    from megatron_ivr.training.experience import ExperienceMaker

    model_dir = str(tiny_models["qwen2_5_vl"])
    cfg = load_config(None, [f"model.path={model_dir}", "trainer.prompts_per_step=2", "rollout.n=2",
                             "rollout.max_new_tokens=8", "algorithm.ivr.enabled=true", "algorithm.ivr.tau=-0.5",
                             "algorithm.overlong_shaping=true", "algorithm.overlong_cache=4",
                             "algorithm.ivr.critique_max_new_tokens=4", "algorithm.ivr.max_rounds=1"])
    samples = read_dataset(synthetic_dir / "train.jsonl", ImageRules(28, 3136, 12544), limit=8).samples
    processor = load_processor(model_dir)
    engine = LocalEngine.from_pretrained(model_dir)
    with RewardFunction(cfg.reward) as reward_fn:
        def maker():
            return ExperienceMaker(cfg, engine, reward_fn, samples, vision_token_ids(processor.tokenizer))
        yield maker


def _rows(experience):
    return [{f.name: getattr(t, f.name) for f in fields(t) if f.name != "images"}
            | {"images": [id(i) for i in t.images]} for t in experience.trajectories]


def test_a_checkpoint_holds_the_experience_made_ahead(parts):
    from megatron_ivr.training.schedule import ExperienceSchedule

    schedule = ExperienceSchedule(parts(), "one_step_off", total_steps=3)
    first = schedule.take(1)  # made now; step 2's starts on the generator thread
    assert schedule._thread is not None
    overlap = schedule.finish(1)
    assert set(overlap) == {"time/wait_for_experience", "time/engine_idle"}
    state = json.loads(json.dumps(schedule.state_dict()))  # what trainer_state.json holds
    assert state["pending"]["step"] == 2 and state["sampler"]["position"] == 4  # two steps drawn
    ahead = schedule.take(2)
    schedule.finish(2)  # one generator thread per engine: this one's step 3 first
    schedule.close()

    resumed = ExperienceSchedule(parts(), "one_step_off", total_steps=3)
    resumed.load_state_dict(state)
    again = resumed.take(2)  # no generation: the checkpoint's experience
    assert _rows(again) == _rows(ahead) and again.sample_ids == ahead.sample_ids
    assert all(t.weight_version == 0 for t in again.trajectories)  # made while the engine served version 0
    assert again.metrics["rollout/responses"] == ahead.metrics["rollout/responses"]
    assert first.sample_ids != ahead.sample_ids
    resumed.finish(2)
    resumed.close()


def test_sync_makes_each_step_when_it_starts(parts):
    from megatron_ivr.training.schedule import ExperienceSchedule

    schedule = ExperienceSchedule(parts(), "sync", total_steps=2)
    schedule.take(1)
    assert schedule._thread is None and schedule.finish(1) == {}
    assert schedule.state_dict()["pending"] is None


def test_a_failure_on_the_generator_thread_reaches_the_trainer(parts):
    from megatron_ivr.training.schedule import ExperienceSchedule

    maker = parts()
    make = maker.make

    def failing(step):
        if step == 2:
            raise RuntimeError("the engine went away")
        return make(step)

    maker.make = failing
    schedule = ExperienceSchedule(maker, "one_step_off", total_steps=2)
    schedule.take(1)
    with pytest.raises(RuntimeError, match="the engine went away"):
        schedule.finish(1)

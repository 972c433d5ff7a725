"""The async schedule (training/async_schedule.py) with the real experience maker, local engine
and reward function: the generator runs ahead by at most ``max_staleness`` batches, a batch
too old for the policy that would train it is dropped and its prompts made again first, and
a checkpoint lists the prompts drawn but not trained. End to end: tests/training/test_async.py."""

from __future__ import annotations

import json

from megatron_ivr.training.async_schedule import AsyncSchedule, keep_fresh
from megatron_ivr.training.experience import Experience, Trajectory
from tests.training.test_schedule import parts  # noqa: F401 (the fixture)


def _trajectory(sample_id: str, group: int, versions: list[int]) -> Trajectory:
    return Trajectory(sample_id, group, "q", [], list(range(len(versions))), [-0.1] * len(versions), 0.0, 0.0, 1.0,
                      weight_version=min(versions), token_versions=versions)


def test_keep_fresh_drops_groups_with_a_token_older_than_the_bound():
    experience = Experience([_trajectory("a", 0, [3, 3]), _trajectory("a", 0, [4]),
                             _trajectory("b", 1, [2, 4]),  # a partial rollout whose first token is too old
                             _trajectory("c", 2, [4, 5])], ["a", "b", "c"], {"x": 1})
    kept, stale = keep_fresh(experience, trainer_version=5, max_staleness=2)
    assert stale == [1] and kept.sample_ids == ["a", "c"]
    assert [(t.sample_id, t.group) for t in kept.trajectories] == [("a", 0), ("a", 0), ("c", 1)]  # renumbered
    same, none = keep_fresh(experience, trainer_version=4, max_staleness=2)
    assert none == [] and same is experience


def _wait_ready(schedule: AsyncSchedule, count: int) -> None:
    with schedule._cond:
        assert schedule._cond.wait_for(lambda: len(schedule._ready) >= count or schedule._error, timeout=120)


def test_runs_ahead_within_the_bound_and_remakes_what_is_too_stale(parts):  # noqa: F811
    maker = parts()
    schedule = AsyncSchedule(maker, total_steps=3, max_staleness=1)
    first = schedule.take(1)  # made from version 0; the generator starts the next batch
    _wait_ready(schedule, 1)
    assert len(schedule._ready) == 1 and schedule._making is None  # one batch ahead, no more
    state = json.loads(json.dumps(schedule.state_dict()))  # what trainer_state.json holds
    ahead = schedule._ready[0]
    assert state["sampler"]["position"] == 4 and state["redo"] == ahead.indices  # drawn, not trained
    # two pushes later (version 2) the batch made from version 0 is 2 behind: dropped, remade first
    maker.engine.pause()
    maker.engine.set_weight_version(2)
    maker.engine.resume()
    second = schedule.take(3)
    schedule.close()
    assert second.metrics["rollout/dropped_groups"] == 2
    assert second.sample_ids == ahead.experience.sample_ids != first.sample_ids
    assert all(t.versions() == [2] * len(t.response_ids) for t in second.trajectories)
    assert second.metrics["rollout/staleness_max"] == 0


def test_a_resumed_schedule_makes_the_listed_prompts_first(parts):  # noqa: F811
    schedule = AsyncSchedule(parts(), total_steps=3, max_staleness=1)
    schedule.take(1)
    _wait_ready(schedule, 1)
    state = json.loads(json.dumps(schedule.state_dict()))
    expected = schedule._ready[0].experience.sample_ids
    schedule.close()
    resumed = AsyncSchedule(parts(), total_steps=3, max_staleness=1)
    resumed.load_state_dict(state)
    again = resumed.take(2)
    resumed.close()
    assert again.sample_ids == expected  # not the sampler's next prompts

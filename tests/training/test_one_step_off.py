"""``rollout.mode=one_step_off`` end to end (IVR-R1 + VICRA on the tiny Qwen2.5-VL): step k
trains on responses generated during step k - 1 from version max(k - 2, 0), the same at every
layout, and a run killed with SIGKILL resumes to the uninterrupted run's samples and losses.
The schedule itself: tests/training/test_schedule.py."""

from __future__ import annotations

import pytest

from tests.training.runs import (
    RL_OVERRIDES,
    assert_same_step,
    kill_after_step,
    run,
    step_records,
    write_config,
)

ONE_STEP_OFF = RL_OVERRIDES + ["trainer.steps=4", "rollout.mode=one_step_off"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, synthetic_dir):
    """The 4-step one_step_off run at TP1, and the sync run with the same settings."""
    out = {}
    for mode in ("sync", "one_step_off"):
        run_dir = tmp_path_factory.mktemp(mode)
        run("train", write_config(run_dir, tiny_models["qwen2_5_vl"], synthetic_dir),
            RL_OVERRIDES + ["trainer.steps=4", f"rollout.mode={mode}"])
        out[mode] = step_records(run_dir / "logs")
    return out


def test_step_k_trains_on_version_k_minus_2(runs):
    sync, off = runs["sync"], runs["one_step_off"]
    assert sorted(off) == [1, 2, 3, 4]
    for step, record in off.items():
        version = max(step - 2, 0)
        assert record["rollout/weight_version_min"] == record["rollout/weight_version_max"] == version
        assert record["rollout/staleness_max"] == step - 1 - version  # behind the policy that trains
        assert record["optim/updated"] == 1.0 and record["weight_sync/version"] == step
        assert record["samples"] == sync[step]["samples"]  # the same prompts, in the sampler's order
        if step < 4:  # the next step's generation overlapped this one's training
            assert record["time/wait_for_experience"] >= 0 and "time/engine_idle" in record
    for record in sync.values():
        assert record["rollout/staleness_max"] == 0
    # step 1 is made before any update in both modes: the same step, to the last digit
    assert off[1]["loss/total"] == pytest.approx(sync[1]["loss/total"], abs=1e-6)
    assert off[1]["throughput/response_tokens"] == sync[1]["throughput/response_tokens"]
    # from step 2 on the responses come from an older policy: another trajectory
    assert off[2]["throughput/response_tokens"] != sync[2]["throughput/response_tokens"] or \
        off[2]["loss/total"] != pytest.approx(sync[2]["loss/total"], abs=1e-6)


@pytest.mark.parametrize("nproc, overrides", [(2, ["parallel.tensor_parallel=2"]),
                                              (2, ["parallel.pipeline_parallel=2"]), (2, [])],
                         ids=["tp2", "pp2", "dp2"])
def test_one_step_off_is_layout_invariant(runs, tmp_path, tiny_models, synthetic_dir, nproc, overrides):
    reference = runs["one_step_off"]
    run("train", write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir), ONE_STEP_OFF + overrides,
        nproc=nproc)
    steps = step_records(tmp_path / "logs")
    for step, record in reference.items():
        other = steps[step]
        assert_same_step(other, record)
        assert other["throughput/response_tokens"] == record["throughput/response_tokens"]


def test_exact_resume_after_sigkill(runs, tmp_path, tiny_models, synthetic_dir):
    """Killed (SIGKILL) in step 3, after the step-2 checkpoint, which holds step 3's responses
    (made during step 2 from version 1, not yet trained): the resumed run trains them, and every
    step equals the uninterrupted run's."""
    expected = runs["one_step_off"]
    overrides = ONE_STEP_OFF + ["checkpoint.save_interval=2"]
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    kill_after_step(config, overrides, tmp_path / "logs", 2)
    result = run("train", config, overrides)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    resumed = step_records(tmp_path / "logs")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert_same_step(resumed[step], expected[step], tol=1e-6)
        assert resumed[step]["rollout/weight_version_max"] == expected[step]["rollout/weight_version_max"]


def test_colocated_offload_refuses_the_overlapped_modes():
    from megatron_ivr.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.mode=one_step_off", "rollout.offload_during_train=true"])
    assert error.value.key == "rollout.mode"
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.mode=async", "rollout.offload_during_train=true"])
    assert error.value.key == "rollout.mode"
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.mode=async", "rollout.max_staleness=0"])
    assert error.value.key == "rollout.max_staleness"
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.mode=fully_async"])
    assert error.value.key == "rollout.mode"

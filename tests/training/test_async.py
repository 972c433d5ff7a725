"""``rollout.mode=async`` end to end (IVR-R1 + VICRA on the tiny Qwen2.5-VL, the local engine on
its generator thread): runs with ``max_staleness`` 1 and 2 complete, no trained token is older
than the bound (from the per-group versions in the metrics), every drawn prompt is trained
once in the sampler's order, at TP2 too; a run killed with SIGKILL resumes, makes the prompts
that were in flight again, and still trains each drawn prompt once, losing none. Partial
rollouts: tests/rollout/test_partial.py; the schedule: tests/training/test_async_schedule.py."""

from __future__ import annotations

import pytest

from megatron_ivr.training.sampler import EpochSampler
from tests.training.runs import RL_OVERRIDES, kill_after_step, run, step_records, write_config

STEPS, PROMPTS = 4, 4  # RL_OVERRIDES: trainer.prompts_per_step=4
ASYNC = RL_OVERRIDES + [f"trainer.steps={STEPS}", "rollout.mode=async"]


def sampler_order(count: int) -> list[int]:
    return EpochSampler(100, 0).draw(count)  # the synthetic set's 100 samples, trainer.seed's default


def trained_indices(records: dict) -> list[int]:
    return [int(sample_id.rsplit("-", 1)[-1]) for step in sorted(records) for sample_id in records[step]["samples"]]


def assert_within_bound(records: dict, bound: int) -> None:
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, record in records.items():
        versions = record["rollout/group_versions"]
        assert len(versions) == len(record["samples"]) == PROMPTS
        assert all(step - 1 - v <= bound for v in versions), (step, versions)  # the policy trains version step - 1
        assert record["rollout/staleness_max"] <= bound and record["rollout/dropped_groups"] == 0
        assert record["optim/updated"] == 1.0 and record["weight_sync/version"] == step
        assert "time/wait_for_experience" in record and "time/engine_idle" in record
        if record.get("mismatch/token_share_lag0", 0) < 1:  # tokens of older versions: their mismatch on its own
            assert "mismatch/abs_logp_diff_mean_lag1" in record


@pytest.mark.parametrize("bound", [1, 2])
def test_async_runs_train_nothing_older_than_the_bound(tmp_path, tiny_models, synthetic_dir, bound):
    run("train", write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir),
        ASYNC + [f"rollout.max_staleness={bound}"])
    records = step_records(tmp_path / "logs")
    assert_within_bound(records, bound)
    assert trained_indices(records) == sampler_order(STEPS * PROMPTS)  # each drawn prompt once, in order
    assert records[1]["rollout/staleness_max"] == 0  # made before any update
    assert max(r["rollout/staleness_max"] for r in records.values()) >= 1  # later ones ran ahead of the trainer


def test_async_at_tp2(tmp_path, tiny_models, synthetic_dir):
    run("train", write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir),
        ASYNC + ["rollout.max_staleness=1", "parallel.tensor_parallel=2"], nproc=2)
    records = step_records(tmp_path / "logs")
    assert_within_bound(records, 1)
    assert trained_indices(records) == sampler_order(STEPS * PROMPTS)


def test_sigkill_and_resume_trains_every_drawn_prompt_once(tmp_path, tiny_models, synthetic_dir):
    """Killed (SIGKILL) in step 3, after the step-2 checkpoint, with up to two batches made or
    in the making ahead of it: the resumed run makes those prompts again first (the checkpoint
    lists them), so the prompts trained over both runs are the sampler's order, each once."""
    overrides = ASYNC + ["rollout.max_staleness=2", "checkpoint.save_interval=2"]
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    kill_after_step(config, overrides, tmp_path / "logs", 2)
    result = run("train", config, overrides)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    records = step_records(tmp_path / "logs")
    assert_within_bound(records, 2)
    assert trained_indices(records) == sampler_order(STEPS * PROMPTS)
    assert records[3]["rollout/staleness_max"] == 0  # made again after the resume, from the restored policy

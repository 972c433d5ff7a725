"""End to end: `megatron-ivr train` (RL with IVR-R1 and VICRA) on the tiny Qwen2.5-VL, alone
and under torchrun: step-0 consistency with the engine, layout invariance, exact resume
after SIGKILL, a clean stop on SIGTERM, a damaged checkpoint skipped, broken samples."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.training.runs import (
    RL_OVERRIDES,
    assert_same_step,
    clean_env,
    command,
    kill_after_step,
    logged_steps,
    run,
    step_records,
    wait_for,
    write_config,
)

LAYOUTS = {  # name: (processes, overrides)
    "tp1": (1, []),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "pp2": (2, ["parallel.pipeline_parallel=2"]),
    "dp2": (2, []),
    "tp2pp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    # the batch layouts and the old-log-prob pass must not change the step either
    "one_sequence_per_row": (1, ["trainer.share_prompts=false"]),
    "packed_rows": (1, ["trainer.pack_length=1500"]),
    # Transformer Engine's packed layout (one row per micro-batch, cu_seqlens), here on the
    # local spec, with tensor parallelism
    "thd_tp2": (2, ["parallel.tensor_parallel=2", "trainer.share_prompts=false", "trainer.pack_length=1500",
                    "trainer.packed_format=thd"]),
    "thd_pp2": (2, ["parallel.pipeline_parallel=2", "trainer.share_prompts=false", "trainer.pack_length=300",
                    "trainer.packed_format=thd"]),
    "old_logprob_pass": (1, ["trainer.recompute_old_logprobs=true"]),
}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_models, synthetic_dir):
    """The 3-step run at TP1 that the other layouts are compared with."""
    run_dir = tmp_path_factory.mktemp("rl_tp1")
    config = write_config(run_dir, tiny_models["qwen2_5_vl"], synthetic_dir)
    run("train", config, RL_OVERRIDES)
    return run_dir, step_records(run_dir / "logs")


def test_rl_run_trains_and_logs(reference_run):
    run_dir, steps = reference_run
    assert sorted(steps) == [1, 2, 3]
    for record in steps.values():
        assert record["optim/updated"] == 1.0
        assert record["optim/grad_norm"] > 0  # the shaped rewards give non-zero advantages
        assert record["rollout/responses"] == 16
        assert record["weight_sync/version"] == record["step"]
        assert len(record["samples"]) == 4
        for key in ("reward/mean", "response/length_mean", "advantage/std", "loss/clip_fraction", "vicra/vg_share",
                    "ivr/eroded_share", "ivr/accepted", "mismatch/kl", "batch/padding_share", "time/rollout",
                    "time/logprob_passes", "time/train", "time/weight_sync", "weight_sync/bytes", "policy/entropy"):
            assert key in record, key
        # per question family: the on-policy accuracy, weighted by responses, averages to the step's
        families = {k: v for k, v in record.items() if k.startswith("reward/accuracy/")}
        assert families and all(0.0 <= v <= 1.0 for v in families.values())
        if len(families) == 1:
            assert next(iter(families.values())) == pytest.approx(record["reward/accuracy"])
    assert sum(r["ivr/accepted"] for r in steps.values()) > 0  # rectified responses were trained
    assert sum(r["loss/shaped_token_share"] for r in steps.values()) > 0
    # a sample is drawn once per epoch: 3 steps x 4 prompts from 100 training samples, no repeats
    drawn = [s for r in steps.values() for s in r["samples"]]
    assert len(drawn) == len(set(drawn)) == 12
    assert (run_dir / "export" / "model.safetensors").exists()
    assert (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists()


def test_step0_engine_and_trainer_logprobs_agree(reference_run):
    """Before any update the engine (transformers, KV cache, left padding) and the trainer
    (Megatron, right padding) score the same sampled tokens: fp32 CPU, <= 1e-5."""
    _, steps = reference_run
    assert steps[1]["mismatch/abs_logp_diff_max"] <= 1e-5
    # after each update the bridge keeps them equal too
    assert max(r["mismatch/abs_logp_diff_max"] for r in steps.values()) <= 1e-5


def test_a_trainer_checkpoint_converts_to_the_exported_policy(reference_run, tmp_path):
    """`megatron-ivr eval model.path=<checkpoint>` converts a trainer checkpoint (model and
    optimizer in one dist_checkpointing save) to HF: bit for bit the policy the run exported
    after the same (last) step."""
    from safetensors.torch import load_file

    from megatron_ivr.evaluation import resolve_policy

    run_dir, _ = reference_run
    converted = resolve_policy(str(run_dir / "checkpoints" / "step_00000003"), tmp_path)
    exported = load_file(run_dir / "export" / "model.safetensors")
    mine = {k: v for f in sorted(Path(converted).glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(mine) == sorted(exported)
    for key, value in exported.items():
        assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2", "tp2pp2", "one_sequence_per_row", "packed_rows",
                                    "thd_tp2", "thd_pp2", "old_logprob_pass"])
def test_layout_invariance(layout, reference_run, tmp_path, tiny_models, synthetic_dir):
    _, reference = reference_run
    nproc, overrides = LAYOUTS[layout]
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    run("train", config, RL_OVERRIDES + overrides, nproc=nproc)
    steps = step_records(tmp_path / "logs")
    for step, record in reference.items():
        other = steps[step]
        assert_same_step(other, record)
        assert other["throughput/response_tokens"] == record["throughput/response_tokens"]  # same tokens sampled
        assert other["reward/mean"] == pytest.approx(record["reward/mean"], abs=1e-9)
        for key in ("policy/entropy", "vicra/vg_share", "vicra/w_mean", "mismatch/kl"):  # reduced over DP ranks
            assert other[key] == pytest.approx(record[key], rel=1e-4, abs=1e-7), key
        if layout.startswith("thd"):  # one row per micro-batch (the reference: one per group)
            assert other["batch/rows"] == other["batch/micro_batches"] and other["batch/shared_prompt_savings"] == 0


def test_exact_resume_after_sigkill(tmp_path, tiny_models, synthetic_dir):
    """2 processes (TP2). The uninterrupted run and a run killed (SIGKILL, every process) in
    step 3 after the step-2 checkpoint and then resumed train the same samples with the same
    losses."""
    overrides = RL_OVERRIDES + ["trainer.steps=4", "checkpoint.save_interval=2", "parallel.tensor_parallel=2"]
    whole = tmp_path / "whole"
    run("train", write_config(whole, tiny_models["qwen2_5_vl"], synthetic_dir), overrides, nproc=2)
    expected = step_records(whole / "logs")

    broken = tmp_path / "broken"
    config = write_config(broken, tiny_models["qwen2_5_vl"], synthetic_dir)
    kill_after_step(config, overrides, broken / "logs", 2, nproc=2)  # step 2 logged after its checkpoint
    result = run("train", config, overrides, nproc=2)
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    resumed = step_records(broken / "logs")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert_same_step(resumed[step], expected[step], tol=1e-6)


def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_models, synthetic_dir):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = RL_OVERRIDES + ["trainer.steps=50"]
    process = subprocess.Popen(command("train", config, overrides), env=clean_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: 1 in logged_steps(tmp_path / "logs"), process, 300)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-4000:]
    assert "stopped by signal" in stdout
    saved = sorted((tmp_path / "checkpoints").glob("step_*/COMPLETE"))
    assert len(saved) == 1
    last = max(logged_steps(tmp_path / "logs"))
    assert saved[0].parent.name == f"step_{last:08d}" and last < 50


def test_damaged_newest_checkpoint_is_skipped(tmp_path, tiny_models, synthetic_dir):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = RL_OVERRIDES + ["trainer.steps=2", "checkpoint.save_interval=1", "checkpoint.keep_last=3"]
    run("train", config, overrides)
    newest = tmp_path / "checkpoints" / "step_00000002"
    shard = max((newest / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated, as by a crash or a full disk
    result = run("train", config, overrides[:-3] + ["trainer.steps=3", "checkpoint.save_interval=1"])
    assert "resumed from" in result.stdout and "step_00000001" in result.stdout


def test_resuming_into_another_models_checkpoints_is_a_clear_error(tmp_path, tiny_models, synthetic_dir):
    """A reused checkpoint.dir from a run of another model: one line naming the key and both
    models, exit 1, instead of dist_checkpointing's list of every missing tensor."""
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = RL_OVERRIDES + ["trainer.steps=1", "checkpoint.save_interval=1", "algorithm.ivr.enabled=false"]
    run("train", config, overrides)
    other = [*overrides[:-3], "trainer.steps=2", f"model.path={tiny_models['qwen3_vl']}"]
    result = subprocess.run(command("train", config, other), env=clean_env(), capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 2  # a config error (checkpoint.dir)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "holds a checkpoint of another model" in error
    assert "checkpoint.dir" in error and str(tiny_models["qwen3_vl"]) in error


def test_broken_samples_are_reported_and_skipped(tmp_path, tiny_models, synthetic_dir):
    """3% of the training rows are broken (missing image, invalid UTF-8, empty question):
    the run trains to the end, names them, and logs the bad share."""
    rows = (synthetic_dir / "train.jsonl").read_bytes().splitlines()
    data = tmp_path / "data"
    data.mkdir()
    broken = list(rows)
    broken[5] = broken[5].replace(b'"images/', b'"images/missing_')
    broken[17] = b'{"id": "bad-utf8", "question": "\xff\xfe", "answer": "1"}'
    broken[40] = json.dumps({"id": "empty-q", "question": "", "answer": "2", "images": []}).encode()
    (data / "train.jsonl").write_bytes(b"\n".join(broken) + b"\n")
    config = write_config(tmp_path / "run", tiny_models["qwen2_5_vl"], synthetic_dir)
    result = run("train", config, RL_OVERRIDES + ["trainer.steps=1", f"data.train_path={data / 'train.jsonl'}",
                                                               f"data.image_root={synthetic_dir}"])
    record = step_records(tmp_path / "run" / "logs")[1]
    assert record["data/train/bad_samples"] == 3
    assert record["data/train/bad_fraction"] == pytest.approx(3 / len(rows))
    for bad_id in ("train-00005", "train.jsonl:18", "empty-q"):  # the UTF-8 line is named by file and line
        assert f"skipping bad sample {bad_id}" in result.stderr


def test_mini_batches_make_one_optimizer_step_each(tmp_path, tiny_models, synthetic_dir):
    """trainer.mini_batches=2: the step's 4 groups become two optimizer steps. With 4 warmup
    steps the learning rate is 1/4 then 2/4 of its peak (logged as their mean)."""
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    run("train", config, RL_OVERRIDES + ["trainer.steps=1", "trainer.mini_batches=2", "trainer.lr_warmup_steps=4"])
    record = step_records(tmp_path / "logs")[1]
    assert record["optim/lr"] == pytest.approx(1e-3 * (0.25 + 0.5) / 2)
    assert record["optim/updated"] == 1.0 and record["optim/grad_norm"] > 0

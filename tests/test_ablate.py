"""`megatron-ivr ablate` end to end on the tiny model (two arms, two seeds, two RL steps),
and the aggregation against hand-computed means and standard deviations."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

from megatron_ivr.ablate import ARMS, CONTROL_ARMS, aggregate, markdown
from tests.training.runs import RL_OVERRIDES, clean_env, write_config


def test_aggregate_means_and_stds():
    results = {("grpo", 0): {"eval/test/accuracy": 0.5, "eval/test/count/accuracy": 1.0, "eval/test/count/count": 4},
               ("grpo", 1): {"eval/test/accuracy": 0.7, "eval/test/count/accuracy": 0.5, "eval/test/count/count": 4},
               ("sft", 0): {"eval/test/accuracy": 0.4, "eval/test/count/accuracy": 0.25}}
    families, table = aggregate(results, ["sft", "grpo"])
    assert families == ["count"]
    assert table["grpo"]["all"][:2] == (pytest.approx(0.6), pytest.approx(statistics.stdev([0.5, 0.7])))
    assert table["sft"]["count"][:2] == (0.25, 0.0)
    text = markdown(families, table, [0, 1])
    assert "| grpo | 0.600 +- 0.141 | 0.750 +- 0.354 |" in text


def test_every_arm_sets_the_whole_algorithm():
    for arm, overrides in ARMS.items():
        if arm != "sft" and arm not in CONTROL_ARMS:
            keys = {o.split("=")[0] for o in overrides}
            assert {"algorithm.vicra.enabled", "algorithm.ivr.enabled", "algorithm.dynamic_sampling"} <= keys, arm


def test_ablate_runs_arms_and_seeds(tiny_models, synthetic_dir, tmp_path):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = [o for o in RL_OVERRIDES if not o.startswith(("trainer.steps", "algorithm."))]
    out = tmp_path / "ablate"
    command = [sys.executable, "-m", "megatron_ivr.cli", "ablate", str(config), *overrides, "trainer.steps=2",
               "eval.max_samples=6", "eval.max_new_tokens=8", "--arms", "sft,grpo+vicra", "--seeds", "0,1",
               "--out", str(out), "--jobs", "2"]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert "| grpo+vicra |" in result.stdout and "| sft |" in result.stdout
    for seed in (0, 1):
        assert (out / "grpo+vicra" / f"seed{seed}" / "hf" / "model.safetensors").exists()
        assert (out / "grpo+vicra" / f"seed{seed}" / "eval" / "summary.json").exists()
    assert not (out / "sft" / "seed1").exists()  # the starting policy is evaluated once
    assert (out / "accuracy.png").stat().st_size > 0 and "Wall time" in (out / "results.md").read_text()
    # an interrupted or repeated ablation reuses finished runs
    again = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("| grpo+vicra |") == 2  # accuracy, macro over answers
    assert "IVR-R1 accepted / step" not in again.stdout  # no arm ran IVR-R1
    assert "images blanked" not in again.stdout  # evaluated without eval.blank_images: no such table


def test_aggregate_other_metrics_and_ivr_rewrites():
    results = {("ivr-r1", 0): {"eval/test_blank/accuracy": 0.2, "eval/test/accuracy_macro": 0.3,
                               "eval/test/union/accuracy_macro": 0.5, "ivr/accepted_per_step": 1.5},
               ("ivr-r1", 1): {"eval/test_blank/accuracy": 0.3, "eval/test/accuracy_macro": 0.5,
                               "eval/test/union/accuracy_macro": 0.25, "ivr/accepted_per_step": 0.5}}
    families, table = aggregate(results, ["ivr-r1"], "accuracy_macro")
    assert families == ["union"] and table["ivr-r1"]["union"][0] == pytest.approx(0.375)
    assert table["ivr-r1"]["ivr/accepted_per_step"][:2] == (1.0, pytest.approx(statistics.stdev([1.5, 0.5])))
    assert "| ivr-r1 | 0.400 +- 0.141 | 0.375 +- 0.177 | 1.00 +- 0.71 |" in markdown(families, table, [0, 1])
    assert aggregate(results, ["ivr-r1"], "accuracy", "test_blank")[1]["ivr-r1"]["all"][0] == pytest.approx(0.25)


@pytest.mark.slow  # about a minute: three SFT and eval subprocesses (the default tier keeps under 25 min)
def test_control_arms_from_each_seeds_policy(tiny_models, synthetic_dir, tmp_path):
    """``model.path`` with ``{seed}`` takes one SFT policy per seed (the sft arm is evaluated per
    seed); ``sft-more`` continues SFT for as many sequences as RL trains on (2 steps x 4 prompts
    x 4 responses = 32 = 4 SFT steps of 8); ``rft`` stops with a clear error when no sampled
    response is accepted (a random policy)."""
    (tmp_path / "seed1").symlink_to(tiny_models["qwen2_5_vl"])
    config = write_config(tmp_path / "run", tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = [o for o in RL_OVERRIDES if not o.startswith(("trainer.steps", "algorithm."))]
    out = tmp_path / "ablate"
    base = [sys.executable, "-m", "megatron_ivr.cli", "ablate", str(config), *overrides, "trainer.steps=2",
            f"model.path={tmp_path}/seed{{seed}}", "eval.max_samples=6", "eval.max_new_tokens=8", "--seeds", "1",
            "--out", str(out)]
    result = subprocess.run([*base, "--arms", "sft,sft-more"], env=clean_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-2000:])
    assert (out / "sft" / "seed1" / "eval" / "summary.json").exists()
    sft_steps = [line for line in (out / "sft-more" / "seed1" / "sft" / "logs" / "metrics.jsonl").read_text()
                 .splitlines() if '"sft/loss"' in line]
    assert len(sft_steps) == 4
    assert (out / "sft-more" / "seed1" / "sft" / "hf" / "model.safetensors").exists()
    failed = subprocess.run([*base, "--arms", "rft"], env=clean_env(), capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "no sampled response on 8 prompts was accepted" in failed.stdout + failed.stderr
    samples = (out / "rft" / "seed1" / "samples" / "eval_train_samples.jsonl").read_text().splitlines()
    assert len(samples) == 8 and all(len(__import__("json").loads(line)["samples"]) == 4 for line in samples)

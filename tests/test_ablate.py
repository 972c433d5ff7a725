"""`megatron-ivr ablate` end to end on the tiny model (two arms, two seeds, two RL steps),
and the aggregation against hand-computed means and standard deviations."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

from megatron_ivr.ablate import ARMS, aggregate, markdown
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
        if arm != "sft":
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
    assert again.returncode == 0 and again.stdout.count("| grpo+vicra |") == 1

"""Every config in configs/ loads and validates (`megatron-ivr config show`), and every GPU
recipe's parallel layout fits its GPUs (the same check `megatron-ivr launch` makes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_ivr.cli import main
from megatron_ivr.config import load_config
from megatron_ivr.launch.launcher import check_sizing

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if load_config(p).trainer.device == "cuda" and p.name != "cluster_base.yaml"]


def test_the_paper_recipes_are_all_there():
    names = {p.stem for p in RECIPES}
    for paper in ("ivr_r1_qwen2_5_vl_7b", "ivr_r1_qwen3_vl_4b", "vicra_grpo_qwen2_5_vl_7b", "vicra_dapo_qwen2_5_vl_7b"):
        assert paper in names and f"{paper}_fp8" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_shows(path, capsys):
    assert main(["config", "show", str(path)]) == 0
    assert "parallel:" in capsys.readouterr().out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_layout_divides_its_gpus(path):
    cfg = load_config(path)
    check_sizing(cfg, "slurm")  # raises ConfigError naming the key otherwise
    launch, parallel = cfg.launch, cfg.parallel
    trainer_gpus = launch.nodes * launch.gpus_per_node
    assert trainer_gpus % (parallel.tensor_parallel * parallel.pipeline_parallel) == 0
    assert launch.gpus_per_node % parallel.tensor_parallel == 0
    data_parallel = trainer_gpus // (parallel.tensor_parallel * parallel.pipeline_parallel)
    assert cfg.trainer.prompts_per_step * cfg.rollout.n >= data_parallel  # every DP rank gets work
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.backend == "sglang"
    for value in (cfg.model.path, cfg.data.train_path, cfg.checkpoint.dir, cfg.logging.dir):
        assert Path(value).is_absolute(), value  # every node reads the same shared paths
    assert (parallel.fp8 is not None) == path.stem.endswith("_fp8")


def test_the_demo_config_launches_locally():
    cfg = load_config(CONFIGS[0].parent / "demo_cpu.yaml", ["parallel.tensor_parallel=2"])
    check_sizing(cfg, "local")
    assert cfg.launch.gpus_per_node == 2


@pytest.mark.parametrize("name, mode, staleness", [("vicra_dapo_qwen2_5_vl_7b_async", "one_step_off", 1),
                                                   ("vicra_dapo_qwen2_5_vl_7b_async2", "async", 2)])
def test_the_async_recipes_are_the_dapo_recipe_overlapped(name, mode, staleness):
    path = CONFIGS[0].parent / f"{name}.yaml"
    cfg, base = load_config(path), load_config(path.with_name("vicra_dapo_qwen2_5_vl_7b.yaml"))
    assert cfg.rollout.mode == mode and cfg.rollout.max_staleness == staleness and base.rollout.mode == "sync"
    assert cfg.launch.placement == "disaggregated" and cfg.algorithm == base.algorithm
    check_sizing(cfg, "slurm")


@pytest.mark.parametrize("name", ["vicra_dapo_qwen2_5_vl_7b_async", "vicra_dapo_qwen2_5_vl_7b_async2"])
def test_colocated_servers_keep_sync(name):
    from megatron_ivr.config import ConfigError

    cfg = load_config(CONFIGS[0].parent / f"{name}.yaml", ["launch.placement=colocated"])
    with pytest.raises(ConfigError) as error:
        check_sizing(cfg, "slurm")
    assert error.value.key == "rollout.mode"


def test_the_moe_recipe_splits_the_experts_and_refuses_a_bad_split():
    from megatron_ivr.config import ConfigError

    path = CONFIGS[0].parent / "ivr_r1_qwen3_vl_30b_a3b.yaml"
    cfg = load_config(path)
    assert cfg.model.family == "qwen3_vl_moe" and cfg.parallel.expert_parallel == 8
    assert cfg.parallel.tensor_parallel == 1 and cfg.launch.placement == "disaggregated"
    check_sizing(cfg, "slurm")
    with pytest.raises(ConfigError) as error:
        check_sizing(load_config(path, ["parallel.expert_parallel=3"]), "slurm")
    assert error.value.key == "parallel.expert_parallel"

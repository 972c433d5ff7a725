"""The tiny Qwen3.5 end to end on CPU (a Gated DeltaNet layer and a gated full-attention
layer; IVR-R1 + VICRA, the in-process engine, prompts shared by their responses): RL at TP2
(sequence parallel), PP2 (one layer kind per stage) and with THD-packed rows at TP2 trains the
same samples with the same losses (1e-5) and gradient norms (1e-5 relative) as at TP1; after
every push the engine's log-probs (transformers, its linear-attention cache, left padding, a
shared prefill) equal the trainer's (1e-5); the exported policy and a trainer checkpoint
converted to HF carry the source's multi-token-prediction heads bit for bit; SFT runs at TP2
and PP2. Qwen3.5-MoE (8 experts, top-2, a gated shared expert) with routing replay: RL at EP2
and TP2 equals EP1, the engine's and the trainer's experts the same (mismatch 0). Parity with
transformers: tests/model_providers/test_qwen3_5_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.runs import RL_OVERRIDES, assert_same_step, run, step_records, write_config

LAYOUTS = {"tp2": ["parallel.tensor_parallel=2"], "pp2": ["parallel.pipeline_parallel=2"],
           "thd_tp2": ["parallel.tensor_parallel=2", "trainer.share_prompts=false", "trainer.pack_length=1500",
                       "trainer.packed_format=thd"]}


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, tiny_qwen3_5_model, synthetic_dir):
    run_dir = tmp_path_factory.mktemp("qwen3_5_tp1")
    config = write_config(run_dir, tiny_qwen3_5_model, synthetic_dir)
    run("train", config, RL_OVERRIDES + ["checkpoint.save_interval=3"])
    return run_dir, step_records(run_dir / "logs")


def test_rl_trains_with_the_engine_serving_the_trainers_policy(tp1, tiny_qwen3_5_model, tmp_path):
    from megatron_ivr.evaluation import resolve_policy

    run_dir, steps = tp1
    assert sorted(steps) == [1, 2, 3]
    for record in steps.values():
        assert record["mismatch/abs_logp_diff_max"] <= 1e-5 and record["weight_sync/version"] == record["step"]
        assert record["optim/grad_norm"] > 0
    assert steps[2]["loss/total"] != steps[1]["loss/total"]
    assert sum(r["ivr/accepted"] for r in steps.values()) > 0  # rectified responses were trained
    source = load_file(tiny_qwen3_5_model / "model.safetensors")
    mtp = {k: v for k, v in source.items() if k.startswith("mtp.")}
    assert mtp
    exported = load_file(run_dir / "export" / "model.safetensors")
    folder = Path(resolve_policy(str(run_dir / "checkpoints" / "step_00000003"), tmp_path))
    converted = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(converted) == sorted(exported) == sorted(source)
    for key, tensor in exported.items():
        assert torch.equal(converted[key], tensor), key
        if key in mtp:
            assert torch.equal(tensor, mtp[key]), key  # carried, not trained
    assert not torch.equal(exported["model.language_model.layers.0.linear_attn.A_log"],
                           source["model.language_model.layers.0.linear_attn.A_log"])  # trained


@pytest.mark.parametrize("layout", ["tp2", "pp2", pytest.param("thd_tp2", marks=pytest.mark.slow)])
def test_rl_at_two_processes_equals_one(tp1, tmp_path, tiny_qwen3_5_model, synthetic_dir, layout):
    _, reference = tp1
    run("train", write_config(tmp_path, tiny_qwen3_5_model, synthetic_dir), RL_OVERRIDES + LAYOUTS[layout], nproc=2)
    other_layout = step_records(tmp_path / "logs")
    assert sorted(other_layout) == [1, 2, 3]
    for step, record in reference.items():
        other = other_layout[step]
        assert_same_step(other, record)
        assert other["throughput/response_tokens"] == record["throughput/response_tokens"]
        assert other["mismatch/abs_logp_diff_max"] <= 1e-5


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_sft_at_two_processes(tmp_path, tiny_qwen3_5_model, synthetic_dir, layout):
    run("sft", write_config(tmp_path, tiny_qwen3_5_model, synthetic_dir), [layout, "logging.progress=false"], nproc=2)
    records = step_records(tmp_path / "sft" / "logs")
    assert sorted(records) == [1, 2, 3, 4] and all(r["sft/loss"] > 0 for r in records.values())
    exported = load_file(tmp_path / "sft" / "hf" / "model.safetensors")
    assert any(key.startswith("mtp.") for key in exported)


MOE_STEPS = RL_OVERRIDES + ["algorithm.routing_replay=replay"]


@pytest.fixture(scope="module")
def moe_ep1(tmp_path_factory, tiny_qwen3_5_moe_model, synthetic_dir):
    run_dir = tmp_path_factory.mktemp("qwen3_5_moe_ep1")
    run("train", write_config(run_dir, tiny_qwen3_5_moe_model, synthetic_dir), MOE_STEPS)
    return step_records(run_dir / "logs")


@pytest.mark.parametrize("layout", ["parallel.expert_parallel=2",
                                    pytest.param("parallel.tensor_parallel=2", marks=pytest.mark.slow)],
                         ids=["ep2", "tp2"])
def test_moe_rl_at_two_processes_equals_one(moe_ep1, tmp_path, tiny_qwen3_5_moe_model, synthetic_dir, layout):
    run("train", write_config(tmp_path, tiny_qwen3_5_moe_model, synthetic_dir), MOE_STEPS + [layout], nproc=2)
    other_layout = step_records(tmp_path / "logs")
    assert sorted(other_layout) == sorted(moe_ep1) == [1, 2, 3]
    for step, record in moe_ep1.items():
        other = other_layout[step]
        assert_same_step(other, record)
        for records in (record, other):  # the engine serves the trainer's policy and routes as it does
            assert records["mismatch/abs_logp_diff_max"] <= 1e-5 and records["weight_sync/version"] == step
            assert records["routing/known_tokens"] > 100 and records["routing/mismatch"] == 0.0
        assert other["moe/load_max_over_mean"] == pytest.approx(record["moe/load_max_over_mean"], abs=1e-12)
    assert moe_ep1[2]["loss/total"] != moe_ep1[1]["loss/total"]

"""The tiny Qwen3-VL-MoE end to end on CPU (8 experts, top-2; IVR-R1 + VICRA, the in-process
engine): RL at EP2, TP2, TP2 x EP2 and TP2 x expert-TP2 trains the same samples with the same losses (1e-5) and
gradient norms (1e-5 relative) as at EP1; after every push the engine's log-probs equal the
trainer's (the bridge gathers the experts over EP, 1e-5), and the trainer routes every token
to the engine's experts (routing replay: mismatch 0, the router statistics equal at every
layout); a run stopped after its step-2 checkpoint and resumed at EP2 continues exactly; SFT
runs at EP2 and TP2. Parity with transformers: tests/model_providers/test_moe_parity.py."""

from __future__ import annotations

import pytest

from tests.training.runs import RL_OVERRIDES, assert_same_step, run, step_records, write_config

STEPS = RL_OVERRIDES + ["algorithm.routing_replay=replay"]  # three RL steps, the engine's routing replayed


@pytest.fixture(scope="module")
def ep1(tmp_path_factory, tiny_moe_model, synthetic_dir):
    run_dir = tmp_path_factory.mktemp("moe_ep1")
    run("train", write_config(run_dir, tiny_moe_model, synthetic_dir), STEPS)
    return step_records(run_dir / "logs")


@pytest.mark.parametrize("layout", [["parallel.expert_parallel=2"], ["parallel.tensor_parallel=2"],
                                    ["parallel.tensor_parallel=2", "parallel.expert_parallel=2"],
                                    ["parallel.tensor_parallel=2", "parallel.expert_tensor_parallel=2"]],
                         ids=["ep2", "tp2", "tp2ep2", "tp2etp2"])
def test_rl_at_two_processes_equals_one(ep1, tmp_path, tiny_moe_model, synthetic_dir, layout):
    """EP2 (the experts split), TP2 (sequence parallel, every expert on both ranks), TP2 with
    the experts split over the same two ranks, and TP2 with each expert split over them."""
    run("train", write_config(tmp_path, tiny_moe_model, synthetic_dir), STEPS + layout, nproc=2)
    other_layout = step_records(tmp_path / "logs")
    assert sorted(other_layout) == sorted(ep1) == [1, 2, 3]
    for step, record in ep1.items():
        other = other_layout[step]
        assert_same_step(other, record)
        assert other["throughput/response_tokens"] == record["throughput/response_tokens"]
        for records in (record, other):  # the engine serves exactly the trainer's policy (experts included)
            assert records["mismatch/abs_logp_diff_max"] <= 1e-5 and records["weight_sync/version"] == step
            # and routes as the trainer does: every fed token's experts known, none different (fp32 CPU)
            assert records["routing/known_tokens"] > 100
            assert records["routing/mismatch"] == records["routing/mismatch_layer0"] == 0.0
        for key in ("routing/known_tokens", "moe/load_max_over_mean", "moe/idle_expert_share"):
            assert other[key] == pytest.approx(record[key], abs=1e-12)  # each token counted once
    assert ep1[2]["loss/total"] != ep1[1]["loss/total"]  # it trains


def test_resume_at_ep2_continues_exactly(ep1, tmp_path, tiny_moe_model, synthetic_dir):
    config = write_config(tmp_path, tiny_moe_model, synthetic_dir)
    first = [o for o in STEPS if not o.startswith("trainer.steps")] + ["trainer.steps=2", "checkpoint.save_interval=1",
                                                                       "parallel.expert_parallel=2"]
    run("train", config, first, nproc=2)
    result = run("train", config, STEPS + ["parallel.expert_parallel=2"], nproc=2)  # 3 steps: resumes at 2
    assert "resumed from" in result.stdout and "step 2" in result.stdout
    resumed = step_records(tmp_path / "logs")
    assert_same_step(resumed[3], ep1[3])


@pytest.mark.parametrize("layout", ["parallel.expert_parallel=2", "parallel.tensor_parallel=2"])
def test_sft_at_two_processes(tmp_path, tiny_moe_model, synthetic_dir, layout):
    run("sft", write_config(tmp_path, tiny_moe_model, synthetic_dir), [layout, "logging.progress=false"], nproc=2)
    records = step_records(tmp_path / "sft" / "logs")
    assert sorted(records) == [1, 2, 3, 4] and all(r["sft/loss"] > 0 for r in records.values())
    assert (tmp_path / "sft" / "hf" / "model.safetensors").exists()

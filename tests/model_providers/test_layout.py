from types import SimpleNamespace

import pytest

from megatron_ivr.config import ConfigError, load_config
from megatron_ivr.model_providers.layout import check_layout, layout_problems

TEXT = SimpleNamespace(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
                       vocab_size=512)


def test_a_layout_that_fits_has_no_problem():
    assert layout_problems(TEXT, None, tp=2, pp=2, world=8) == []


def test_each_impossible_layout_names_the_key_and_the_model_value():
    problems = layout_problems(TEXT, None, tp=3, pp=3, world=4)
    text = " ".join(problems)
    assert "parallel.pipeline_parallel=3 must divide the model's num_hidden_layers (4)" in text
    assert "parallel.tensor_parallel=3 must divide the model's num_key_value_heads (2)" in text
    assert "does not divide the number of processes (4)" in text


def test_deepstack_layers_must_sit_on_the_first_stage():
    vision = SimpleNamespace(deepstack_visual_indexes=[0, 1, 2])
    problems = layout_problems(TEXT, vision, tp=1, pp=2, world=2)
    assert any("deepstack feeds the first 3" in p for p in problems)


def test_expert_parallel_layouts():
    moe = SimpleNamespace(**vars(TEXT), num_experts=8)
    assert layout_problems(moe, None, tp=1, pp=2, world=4, ep=2) == []
    assert "this one is dense" in " ".join(layout_problems(TEXT, None, tp=1, pp=1, world=2, ep=2))
    assert "must divide the model's num_experts (8)" in " ".join(layout_problems(moe, None, tp=1, pp=1, world=3, ep=3))
    assert "2 x 1 must divide the 3 processes of a pipeline stage" in " ".join(
        layout_problems(moe, None, tp=1, pp=1, world=3, ep=2))
    assert layout_problems(moe, None, tp=2, pp=1, world=2, ep=2) == []  # sequence parallel, experts over TP ranks
    assert layout_problems(moe, None, tp=2, pp=1, world=2, etp=2) == []  # each expert split over the TP ranks
    assert "needs a mixture-of-experts model" in " ".join(layout_problems(TEXT, None, tp=2, pp=1, world=2, etp=2))
    assert "2 x 2 must divide the 2 processes" in " ".join(layout_problems(moe, None, tp=2, pp=1, world=2, ep=2, etp=2))
    odd = SimpleNamespace(**vars(TEXT), num_experts=8, moe_intermediate_size=45)
    assert "must divide the model's moe_intermediate_size (45)" in " ".join(
        layout_problems(odd, None, tp=1, pp=1, world=2, etp=2))


def test_routing_replay_is_refused_for_a_dense_model(tiny_models):
    cfg = load_config(None, ["algorithm.routing_replay=record"])
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model") as info:
        check_layout(cfg, 1, str(tiny_models["qwen3_vl"]))
    assert info.value.key == "algorithm.routing_replay"


def test_gated_deltanet_heads_must_split_over_tensor_parallel():
    """Qwen3.5: TP splits the Gated DeltaNet's key and value heads (megatron-core asserts it deep
    in its config; here it is a problem naming the key and the model's value)."""
    hybrid = SimpleNamespace(**vars(TEXT), linear_num_key_heads=2, linear_num_value_heads=6)
    assert layout_problems(hybrid, None, tp=2, pp=1, world=2) == []
    problems = " ".join(layout_problems(hybrid, None, tp=4, pp=1, world=4))
    assert "parallel.tensor_parallel=4 must divide the model's linear_num_key_heads (2)" in problems
    assert "parallel.tensor_parallel=4 must divide the model's linear_num_value_heads (6)" in problems

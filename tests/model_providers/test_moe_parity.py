"""Qwen3-VL-MoE on Megatron-Core (megatron-core's MoE layer: transformers' router, sequential
experts) against ``Qwen3VLMoeForConditionalGeneration`` in fp32, 8 experts, top-2, images of
two sizes, at EP1, EP2 (the experts split over two ranks), PP2, EP2 x PP2, TP2 (sequence
parallelism, which megatron-core needs for MoE at TP > 1) and TP2 with the experts split over
the same two ranks (EP2 x TP2), and TP2 with each expert split over the two ranks too (expert
tensor parallel 2): per-token log-probs, entropies and the no-image pass within
1e-5, the gradient norm within 1e-5 relative and every tensor's gradient within 1e-4 of its
largest entry, THD packing equal to one row per sequence, the
replicated vision tower's gradients equal on the TP ranks, and HF -> Megatron (this layout) ->
HF bit-exact for every tensor, the fused expert tensors included (in the released
checkpoints' layout)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.model_providers.test_parity import (
    TOL,
    _max_diff,
    gradient_mismatches,
    run_worker,
    transformers_reference,
)

# tp, pp, ep, processes, expert tp
LAYOUTS = {"ep1": (1, 1, 1, 1, 1), "ep2": (1, 1, 2, 2, 1), "pp2": (1, 2, 1, 2, 1), "ep2pp2": (1, 2, 2, 4, 1),
           "tp2": (2, 1, 1, 2, 1), "tp2ep2": (2, 1, 2, 2, 1), "tp2etp2": (2, 1, 1, 2, 2)}


@pytest.fixture(scope="module")
def reference(tiny_moe_model):
    return transformers_reference(tiny_moe_model, "qwen3_vl_moe")


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_run(request, tiny_moe_model, tmp_path_factory):
    tp, pp, ep, nproc, etp = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, run_worker(out, tp, pp, [tiny_moe_model], ep=ep, nproc=nproc, etp=etp)["qwen3_vl_moe"]


def test_logprobs_entropy_and_no_image_pass_match_transformers(layout_run, reference):
    name, out, results = layout_run
    got = torch.load(out / "qwen3_vl_moe.pt", weights_only=True)
    assert _max_diff(got["logprobs"], reference["logprobs"]) <= TOL, name
    assert _max_diff(got["entropy"], reference["entropy"]) <= TOL, name
    assert _max_diff(got["logprobs_no_image"], reference["logprobs_no_image"]) <= TOL, name
    assert results["thd_max_diff"] <= TOL, name
    assert results["vision_grad_spread"] == 0.0, name  # identical on every TP rank (sequence parallel too)


def test_gradients_match_transformers(layout_run, reference):
    name, out, results = layout_run
    assert abs(results["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"] <= TOL, name
    assert gradient_mismatches(out / "qwen3_vl_moe_grads.pt", reference) == [], name


def test_round_trip_is_bit_exact(layout_run, tiny_moe_model):
    name, out, _ = layout_run
    original = load_file(tiny_moe_model / "model.safetensors")
    exported = load_file(out / "qwen3_vl_moe_export" / "model.safetensors")
    assert sorted(exported) == sorted(original), name
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), (name, key)
    assert original["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 96)  # [E, H, 2I]

"""Converters: HF -> Megatron distributed checkpoint at one layout -> HF at another is
bit-exact; a config that does not match the checkpoint names the tensor and both shapes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from megatron_ivr.model_providers.convert import META_NAME, hf_to_megatron, megatron_to_hf
from megatron_ivr.model_providers.manifest import CheckpointRefused


def assert_bit_exact(original_dir, exported_dir):
    original = load_file(original_dir / "model.safetensors")
    exported = {}
    for path in sorted(exported_dir.glob("*.safetensors")):
        exported.update(load_file(path))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("family, save_layout, load_layout", [
    ("qwen2_5_vl", (2, 1), (1, 2)),   # saved TP2, exported from PP2
    ("qwen3_vl", (1, 2), (2, 1)),     # saved PP2 (tied embeddings on two stages), exported from TP2
])
def test_round_trip_across_layouts(tiny_models, tmp_path, family, save_layout, load_layout):
    ckpt = hf_to_megatron(tiny_models[family], tmp_path / "megatron", *save_layout)
    meta = json.loads((ckpt / META_NAME).read_text())
    assert (meta["family"], meta["tp"], meta["pp"]) == (family, *save_layout)
    assert (ckpt / "hf" / "config.json").exists() and (ckpt / "hf" / "tokenizer.json").exists()
    out = megatron_to_hf(ckpt, tmp_path / "hf", *load_layout)
    assert_bit_exact(tiny_models[family], out)
    for name in ("config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_models[family] / name).read_bytes()
    assert not list(tmp_path.glob(".*.partial")) and not list(tmp_path.glob(".*.old"))


@pytest.mark.parametrize("save_layout, load_layout", [
    ((1, 1, 2, 1), (1, 2, 1, 1)), ((1, 2, 1, 1), (1, 1, 2, 1)), ((2, 1, 2, 1), (1, 2, 1, 1)),
    ((1, 2, 1, 1), (2, 1, 1, 2))], ids=["saved_ep2_loaded_pp2", "saved_pp2_loaded_ep2", "saved_tp2ep2_loaded_pp2",
                                        "saved_pp2_loaded_tp2etp2"])
def test_moe_round_trip_across_layouts(tiny_moe_model, tmp_path, save_layout, load_layout):
    """Qwen3-VL-MoE (tp, pp, ep, expert tp): the experts saved split over two ranks come back
    whole on the pipeline stages, and the reverse, also from TP2 (the dense weights split, the
    experts split over the same two ranks) and into TP2 with each expert split over the two
    ranks; the fused expert tensors bit-exact."""
    tp, pp, ep, etp = save_layout
    ckpt = hf_to_megatron(tiny_moe_model, tmp_path / "megatron", tp, pp, ep=ep, etp=etp)
    assert json.loads((ckpt / META_NAME).read_text())["ep"] == ep
    tp, pp, ep, etp = load_layout
    assert_bit_exact(tiny_moe_model, megatron_to_hf(ckpt, tmp_path / "hf", tp, pp, ep=ep, etp=etp))


@pytest.mark.parametrize("family, save_layout, load_layout", [
    ("qwen3_5", (2, 1, 1), (1, 2, 1)),
    pytest.param("qwen3_5", (1, 2, 1), (2, 1, 1), marks=pytest.mark.slow),
    ("qwen3_5_moe", (2, 1, 2), (1, 2, 1))],
    ids=["saved_tp2_loaded_pp2", "saved_pp2_loaded_tp2", "moe_saved_tp2ep2_loaded_pp2"])
def test_qwen3_5_round_trip_across_layouts(model_dirs, tmp_path, family, save_layout, load_layout):
    """Qwen3.5 (tp, pp, ep): the Gated DeltaNet's fused in_proj and conv1d split by section
    over TP2, the gated attention's per-head [query; gate] rows regrouped, bit-exact at another
    layout; the multi-token-prediction heads, which the Megatron model does not hold, kept in
    the checkpoint's ``hf/carried.safetensors`` and written back. Qwen3.5-MoE: one tensor per
    expert, the experts split over EP2, the shared expert and its gate over TP2."""
    from megatron_ivr.model_providers.hf_checkpoint import CARRIED_FILE

    source = model_dirs(family)
    tp, pp, ep = save_layout
    ckpt = hf_to_megatron(source, tmp_path / "megatron", tp, pp, ep=ep)
    carried = load_file(ckpt / "hf" / CARRIED_FILE)
    assert carried and all(name.startswith("mtp.") for name in carried)
    tp, pp, ep = load_layout
    assert_bit_exact(source, megatron_to_hf(ckpt, tmp_path / "hf", tp, pp, ep=ep))


def test_mismatched_config_names_tensor_and_shapes(tiny_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_models["qwen2_5_vl"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (bad / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "convert", "hf-to-megatron", str(bad),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "language.decoder.layers.0.mlp.linear_fc1.weight" in result.stderr
    assert "(256, 64)" in result.stderr and "(512, 64)" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_megatron_to_hf_refuses_other_folders(tmp_path):
    with pytest.raises(CheckpointRefused, match="not a megatron-ivr checkpoint"):
        megatron_to_hf(tmp_path, tmp_path / "out")

"""Shared fixtures: a small synthetic dataset and the two tiny models, made once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from megatron_ivr.config.schema import SyntheticDataConfig
    from megatron_ivr.data.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(SyntheticDataConfig(output_dir=str(out), num_train=100, num_val=20, num_test=20, seed=3))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from megatron_ivr.config.schema import SyntheticDataConfig
    from megatron_ivr.data.synthetic.generate import synthetic_corpus
    from megatron_ivr.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(synthetic_corpus(SyntheticDataConfig(), count=300), 400)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """{family: folder} for tiny Qwen2.5-VL and Qwen3-VL with a BPE tokenizer."""
    from megatron_ivr.config.schema import TinyModelConfig
    from megatron_ivr.models.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("models")
    return {family: make_tiny_model(family, TinyModelConfig(), tiny_tokenizer, out / family, 3136, 12544)
            for family in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3-VL-MoE folder: 8 experts per layer, 2 per token, the fused expert tensors
    in the released checkpoints' layout."""
    from megatron_ivr.config.schema import TinyModelConfig
    from megatron_ivr.models.tiny import make_tiny_model

    return make_tiny_model("qwen3_vl_moe", TinyModelConfig(), tiny_tokenizer,
                           tmp_path_factory.mktemp("models") / "qwen3_vl_moe", 3136, 12544)


@pytest.fixture(scope="session")
def tiny_qwen3_5_model(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3.5 folder: a Gated DeltaNet layer, then a gated full-attention layer; norm
    weights moved off their initial values; random multi-token-prediction tensors (``mtp.*``)."""
    from megatron_ivr.config.schema import TinyModelConfig
    from megatron_ivr.models.tiny import make_tiny_model

    return make_tiny_model("qwen3_5", TinyModelConfig(), tiny_tokenizer,
                           tmp_path_factory.mktemp("models") / "qwen3_5", 3136, 12544)


@pytest.fixture(scope="session")
def tiny_qwen3_5_moe_model(tmp_path_factory, tiny_tokenizer):
    """A tiny Qwen3.5-MoE folder: the Qwen3.5 layers with 8 experts per MLP (top-2) and a
    gated shared expert; one tensor per expert, as the released checkpoints hold them."""
    from megatron_ivr.config.schema import TinyModelConfig
    from megatron_ivr.models.tiny import make_tiny_model

    return make_tiny_model("qwen3_5_moe", TinyModelConfig(), tiny_tokenizer,
                           tmp_path_factory.mktemp("models") / "qwen3_5_moe", 3136, 12544)


@pytest.fixture(scope="session")
def model_dirs(tiny_models, request):
    """``model_dirs(family)``: the tiny model folder of any family (built on first use)."""
    fixtures = {"qwen3_vl_moe": "tiny_moe_model", "qwen3_5": "tiny_qwen3_5_model",
                "qwen3_5_moe": "tiny_qwen3_5_moe_model"}

    def folder(family: str):
        if family in fixtures:
            return request.getfixturevalue(fixtures[family])
        return tiny_models[family]

    return folder

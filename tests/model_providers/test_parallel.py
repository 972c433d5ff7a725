"""``trainer.device``: what each choice does before the process groups exist."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_ivr.config import ConfigError
from megatron_ivr.model_providers.parallel import select_device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="sees no CUDA device") as err:
        select_device("cuda")
    assert err.value.key == "trainer.device"


def test_cpu_hides_the_gpus_from_this_process(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    select_device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()


def test_auto_changes_nothing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    select_device("auto")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"

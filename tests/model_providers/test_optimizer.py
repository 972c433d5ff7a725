"""Optimizer settings; the DDP + distributed optimizer step itself: test_data_parallel.py."""

from __future__ import annotations

import pytest
import torch


def test_optimizer_settings_from_the_run_config():
    from megatron_ivr.config import load_config
    from megatron_ivr.model_providers.optimizer import OptimizerSettings

    cfg = load_config(None, ["trainer.lr=3e-6", "trainer.grad_clip=0.5", "trainer.weight_decay=0.01"])
    settings = OptimizerSettings.from_config(cfg.trainer)
    assert (settings.lr, settings.clip_grad, settings.weight_decay) == (3e-6, 0.5, 0.01)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bf16_policy_has_one_dtype_and_each_parameter_its_own_main_copy(tiny_models, family):
    """The local spec's norms ignore ``params_dtype``; left float32 inside a bf16 model, they made
    megatron's distributed optimizer look up another parameter's fp32 main copy for a parameter
    (saving the optimizer state failed with a size mismatch, or stored states under the wrong
    names where sizes agreed)."""
    from megatron_ivr.model_providers.optimizer import OptimizerSettings
    from megatron_ivr.model_providers.parallel import ParallelLayout, init_parallel
    from megatron_ivr.model_providers.policy import load_policy

    init_parallel(ParallelLayout())
    policy = load_policy(str(tiny_models[family]), dtype="bfloat16", optim=OptimizerSettings(lr=1e-3))
    assert {param.dtype for param in policy.model.parameters()} == {torch.bfloat16}
    checked = 0
    for inner in policy.optimizer.chained_optimizers:
        for buffer_ranges in inner.gbuf_ranges:
            for bucket_ranges in buffer_ranges.values():
                for bucket in bucket_ranges:
                    for param, where in bucket["param_map"].items():
                        main = inner._get_main_param_and_optimizer_states(param)["param"]
                        shard = param.detach().view(-1)[where["param"].start:where["param"].end].float()
                        assert main.shape == shard.shape and torch.equal(main, shard)
                        checked += 1
    assert checked == sum(1 for _ in policy.model.parameters())

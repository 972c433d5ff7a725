"""Optimizer settings; the DDP + distributed optimizer step itself: test_data_parallel.py."""

from __future__ import annotations


def test_optimizer_settings_from_the_run_config():
    from megatron_ivr.config import load_config
    from megatron_ivr.training.optimizer import OptimizerSettings

    cfg = load_config(None, ["trainer.lr=3e-6", "trainer.grad_clip=0.5", "trainer.weight_decay=0.01"])
    settings = OptimizerSettings.from_config(cfg.trainer)
    assert (settings.lr, settings.clip_grad, settings.weight_decay) == (3e-6, 0.5, 0.01)

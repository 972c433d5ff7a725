"""Optimizer settings; the DDP + distributed optimizer step itself: test_data_parallel.py."""

from __future__ import annotations

import pytest
import torch


def test_the_optimizer_takes_the_run_config_as_it_is(tiny_models):
    """No translated twin: megatron's optimizer is built from ``trainer.*`` itself."""
    from megatron_ivr.config import load_config
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.policy import load_policy

    cfg = load_config(None, ["trainer.lr=3e-6", "trainer.grad_clip=0.5", "trainer.weight_decay=0.01",
                             "trainer.min_lr=1e-6", "trainer.lr_schedule=linear"])
    init_parallel(ParallelismConfig())
    policy = load_policy(str(tiny_models["qwen2_5_vl"]), optim=cfg.trainer, schedule_steps=4)
    config = policy.optimizer.config
    assert (config.lr, config.clip_grad, config.weight_decay) == (3e-6, 0.5, 0.01)
    assert (policy.scheduler.max_lr, policy.scheduler.min_lr, policy.scheduler.lr_decay_style) == (3e-6, 1e-6, "linear")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_bf16_policy_has_one_dtype_and_each_parameter_its_own_main_copy(tiny_models, family):
    """The local spec's norms ignore ``params_dtype``; left float32 inside a bf16 model, they made
    megatron's distributed optimizer look up another parameter's fp32 main copy for a parameter
    (saving the optimizer state failed with a size mismatch, or stored states under the wrong
    names where sizes agreed)."""
    from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.policy import load_policy

    init_parallel(ParallelismConfig())
    policy = load_policy(str(tiny_models[family]), dtype="bfloat16", optim=TrainerConfig(lr=1e-3))
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


def test_global_loss_scale_undoes_both_averagings():
    from megatron_ivr.model_providers.optimizer import global_loss_scale

    assert global_loss_scale(4, 2) == 8.0 and global_loss_scale(1, 1) == 1.0 and global_loss_scale(0, 3) == 3.0


def test_global_loss_scale_matches_the_installed_megatron_schedule(tiny_models):
    """The installed megatron-core divides a returned loss by the number of micro-batches: the
    same objective split into 1 or 3 micro-batches, each scaled by ``global_loss_scale``, gives
    the same gradient. And the installed version is one the normalisation was checked against."""
    import megatron.core
    from packaging.specifiers import SpecifierSet

    from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
    from megatron_ivr.model_providers.batching import ScoredSequence, build_model_batch
    from megatron_ivr.model_providers.logprobs import run_schedule, vocab_parallel_logprobs
    from megatron_ivr.model_providers.optimizer import LOSS_NORMALISATION_MATCHES, global_loss_scale
    from megatron_ivr.model_providers.parallel import init_parallel
    from megatron_ivr.model_providers.policy import load_policy
    from megatron_ivr.model_providers.qwen_vl import causal_mask
    from megatron_ivr.models.processor import load_processor

    assert megatron.core.__version__ in SpecifierSet(LOSS_NORMALISATION_MATCHES)
    model_dir = str(tiny_models["qwen2_5_vl"])
    init_parallel(ParallelismConfig())
    policy = load_policy(model_dir, optim=TrainerConfig(lr=1e-3))
    processor = load_processor(model_dir)
    batch = build_model_batch(processor, policy.family, policy.hf_config,
                              [ScoredSequence("count the shapes", [], [5, 6, 7, 8])])

    def gradient(parts: int) -> torch.Tensor:
        policy.ddp.zero_grad_buffer()
        scale = global_loss_scale(parts, 1)

        def loss_fn(logits):  # 1/parts of the objective in each micro-batch
            nll = -(vocab_parallel_logprobs(logits, batch.targets) * batch.loss_mask).sum()
            return nll / parts * scale, nll.detach()

        run_schedule(policy.ddp, [(batch, loss_fn)] * parts, causal_mask, forward_only=False)
        return torch.cat([p.main_grad.flatten().clone() for p in policy.model.parameters()])

    one, three = gradient(1), gradient(3)
    assert one.abs().sum() > 0
    # float32 rounding of three partial sums (a wrong normalisation would be off by 3x)
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5 * one.abs().max().item())

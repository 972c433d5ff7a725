"""The MoE load-balancing loss is a config value (``model.moe_aux_loss_coeff``,
``qwen_vl.moe_config``): 0 by default (no term; RL keeps the pretrained router); set, megatron's
aux loss adds its gradient to the routers and leaves the language-model loss's own
gradient at the output layer unchanged."""

from __future__ import annotations

import torch
from PIL import Image

from megatron_ivr.config.schema import ParallelismConfig, TrainerConfig
from megatron_ivr.model_providers.batching import ScoredSequence, build_model_batch
from megatron_ivr.model_providers.optimizer import train_step
from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel
from megatron_ivr.model_providers.policy import load_policy
from megatron_ivr.model_providers.qwen_vl import causal_mask
from megatron_ivr.models.processor import load_processor


def test_the_aux_loss_coefficient_reaches_the_routers_only_when_set(tiny_moe_model):
    init_parallel(ParallelismConfig())
    try:
        processor = load_processor(tiny_moe_model)
        items = [ScoredSequence("how many?", [Image.new("RGB", (56, 56), (9, 200, 9))], [5, 6, 7, 8, 9, 10])]
        grads = {}
        for coeff in (0.0, 0.5):
            policy = load_policy(str(tiny_moe_model), optim=TrainerConfig(lr=0.0, grad_clip=0.0),
                                   moe_aux_loss_coeff=coeff)  # no clipping: the gradients as computed
            config = policy.model.config
            assert config.moe_aux_loss_coeff == coeff
            assert config.moe_router_load_balancing_type == ("none" if coeff == 0 else "aux_loss")
            batch = build_model_batch(processor, policy.family, policy.hf_config, items)
            train_step(policy.ddp, policy.optimizer, [batch], causal_mask)
            layers = policy.model.language.decoder.layers
            grads[coeff] = ([layer.mlp.router.weight.main_grad.clone() for layer in layers],
                            policy.model.language.output_layer.weight.main_grad.clone())
        (routers_off, output_off), (routers_on, output_on) = grads[0.0], grads[0.5]
        assert torch.equal(output_off, output_on)  # the loss itself is unchanged
        for off, on in zip(routers_off, routers_on):
            assert (on - off).norm() > 0.1 * off.norm()
    finally:
        destroy_parallel()

"""Check a parallel layout (and the packing the attention layers can run) against the model
before any process group is made, so that an impossible layout is a config error naming
``parallel.*`` or ``trainer.*`` and the model's value, not an assert deep inside megatron-core."""

from __future__ import annotations

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.config.schema import TrainerConfig
from megatron_ivr.model_providers.qwen_vl import transformer_engine_available


def layout_problems(text_config, vision_config, tp: int, pp: int, world: int, ep: int = 1, etp: int = 1) -> list[str]:
    """Every reason why (tp, pp, ep, etp) cannot hold this model on ``world`` processes."""
    problems = []
    experts = int(getattr(text_config, "num_experts", 0) or 0)
    for key, value in (("expert_parallel", ep), ("expert_tensor_parallel", etp)):
        if value > 1 and not experts:
            problems.append(f"parallel.{key}={value} needs a mixture-of-experts model; this one is dense")
    if experts and experts % ep:
        problems.append(f"parallel.expert_parallel={ep} must divide the model's num_experts ({experts})")
    expert_size = int(getattr(text_config, "moe_intermediate_size", 0) or 0)
    if experts and expert_size % etp:
        problems.append(f"parallel.expert_tensor_parallel={etp} must divide the model's moe_intermediate_size "
                        f"({expert_size})")
    if ep * etp > 1 and world % (tp * pp) == 0 and (world // pp) % (ep * etp):
        problems.append(f"parallel.expert_parallel x parallel.expert_tensor_parallel = {ep} x {etp} must divide the "
                        f"{world // pp} processes of a pipeline stage")
    if world % (tp * pp):
        problems.append(f"parallel.tensor_parallel x parallel.pipeline_parallel = {tp} x {pp} = {tp * pp} does not "
                        f"divide the number of processes ({world}); data parallel size = world / (tp x pp)")
    layers = text_config.num_hidden_layers
    if layers % pp:
        problems.append(f"parallel.pipeline_parallel={pp} must divide the model's num_hidden_layers ({layers})")
    checks = (("num_attention_heads", text_config.num_attention_heads),
              ("num_key_value_heads", text_config.num_key_value_heads),
              ("intermediate_size", text_config.intermediate_size), ("vocab_size", text_config.vocab_size))
    # Qwen3.5: the Gated DeltaNet's key and value heads split over TP; the MoE's shared expert too
    checks += tuple((name, getattr(text_config, name)) for name in (
        "linear_num_key_heads", "linear_num_value_heads", "shared_expert_intermediate_size")
        if getattr(text_config, name, None))
    for name, value in checks:
        if value % tp:
            problems.append(f"parallel.tensor_parallel={tp} must divide the model's {name} ({value})")
    deepstack = len(getattr(vision_config, "deepstack_visual_indexes", None) or [])
    if deepstack and pp > 1 and layers % pp == 0 and layers // pp < deepstack:
        problems.append(f"parallel.pipeline_parallel={pp} leaves {layers // pp} decoder layers on the first stage, "
                        f"but Qwen3-VL's deepstack feeds the first {deepstack}")
    return problems


def check_layout(cfg, world: int, model_path: str) -> None:
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path)
    text = getattr(hf_config, "text_config", hf_config)
    problems = layout_problems(text, getattr(hf_config, "vision_config", None), cfg.parallel.tensor_parallel,
                               cfg.parallel.pipeline_parallel, world, cfg.parallel.expert_parallel,
                               cfg.parallel.expert_tensor_parallel)
    if problems:
        raise ConfigError(f"parallel layout does not fit {model_path}: " + "; ".join(problems), key="parallel")
    if cfg.algorithm.routing_replay != "off" and not getattr(text, "num_experts", 0):
        raise ConfigError(f"algorithm.routing_replay={cfg.algorithm.routing_replay} needs a mixture-of-experts model; "
                          f"{model_path} is dense", key="algorithm.routing_replay")


def check_packing(trainer: TrainerConfig) -> None:
    """Shared prompts need an explicit attention mask, which Transformer Engine's fused
    attention does not take; its THD format (``cu_seqlens``) packs single sequences, which is
    what ``trainer.pack_length`` becomes on TE layers (model_providers/batching.py)."""
    if not transformer_engine_available():
        return
    if trainer.share_prompts:
        raise ConfigError("trainer.share_prompts needs megatron-core's local attention spec (a group's responses "
                          "share one prompt copy through an attention mask, which Transformer Engine's attention "
                          "does not take): set trainer.share_prompts=false; trainer.pack_length > 0 then packs "
                          "sequences in Transformer Engine's THD format", key="trainer.share_prompts")
    if trainer.packed_format == "mask" and trainer.pack_length > 0:
        raise ConfigError("trainer.packed_format=mask needs megatron-core's local attention spec; with Transformer "
                          "Engine use auto or thd", key="trainer.packed_format")

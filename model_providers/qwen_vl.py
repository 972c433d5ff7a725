"""The Qwen-VL model on Megatron-Core, shared by Qwen2.5-VL and Qwen3-VL.

``QwenVLModel`` = the Hugging Face vision tower (replicated on every tensor-parallel rank
of the first pipeline stage) + the language decoder as a megatron-core ``GPTModel``
(tensor and pipeline parallel) with Qwen's MRoPE. Image features replace the embeddings
of the ``<|image_pad|>`` positions; Qwen3-VL's deepstack features are added to the hidden
states of the first decoder layers at those positions.

Why the vision tower stays the transformers module: it is small next to the decoder (0.7B
of 8B), it is kept in BF16 under FP8 recipes anyway, and reusing the reference code keeps
its numerics exact. Because every TP rank runs it on the same input and receives the
same (TP-all-reduced) gradient at its output, its gradients are identical across TP ranks
by construction (``tests/model_providers`` checks this); it is marked as a TP-duplicated
parameter so gradient norms count it once.

A family is described by :class:`QwenVLFamily`: its transformers classes, MRoPE layout,
whether it has QKV bias, QK-norm, deepstack, mixture-of-experts layers and Qwen3.5's hybrid
decoder (Gated DeltaNet layers between gated full-attention layers, zero-centered norms,
partial rotary). One code path serves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import Fp8Recipe, ModelType
from megatron.core.fp8_utils import get_fp8_align_size
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.experimental_attention_variant_module_specs import (
    get_transformer_block_with_experimental_attention_variant_spec,
)
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from torch import nn

from megatron_ivr.model_providers.block_attention import BlockMask, block_attention
from megatron_ivr.model_providers.gated_delta_net import GatedDeltaNetSubmodules, QwenGatedDeltaNet
from megatron_ivr.model_providers.rope import QwenMRoPE
from megatron_ivr.model_providers.routing import RoutingTargets, install_router_hooks, set_targets


@dataclass(frozen=True)
class QwenVLFamily:
    name: str
    hf_model_class: str  # transformers ForConditionalGeneration class name
    hf_base_model_class: str  # the class holding get_rope_index
    vision_class: str  # transformers vision tower class name
    mrope_layout: str  # "contiguous" | "interleaved"
    deepstack: bool
    qk_norm: bool = False
    moe: bool = False  # every decoder MLP a mixture of experts (megatron-core's MoELayer)
    # Qwen3.5: Gated DeltaNet layers where text_config.layer_types says "linear_attention", gated
    # full attention elsewhere, zero-centered RMSNorm weights (x / rms(x) * (1 + w)), partial rotary
    hybrid_linear_attention: bool = False

    def transformers_class(self, name: str):
        import transformers

        return getattr(transformers, name, None) or _import_model_class(self.name, name)

    def language_config(self, hf_config):
        return hf_config.text_config

    def transformer_config(self, hf_config, tp: int = 1, pp: int = 1, params_dtype=torch.float32,
                           fp8: Optional[str] = None, use_cpu_initialization: bool = True,
                           random_init: bool = False, ep: int = 1, moe_aux_loss_coeff: float = 0.0,
                           etp: int = 1):
        """megatron-core ``TransformerConfig`` of the language decoder (see the mapping in
        docs/models.md). ``random_init=False`` skips drawing random weights that a checkpoint
        load overwrites anyway (megatron still allocates and tags the TP shards)."""
        text = self.language_config(hf_config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kwargs = dict(
            num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
            num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
            ffn_hidden_size=text.intermediate_size, kv_channels=head_dim,
            normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
            add_qkv_bias=bool(getattr(text, "attention_bias", self.name == "qwen2_5_vl")),
            qk_layernorm=self.qk_norm,
            hidden_dropout=0.0, attention_dropout=0.0,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            # sequence parallelism at TP > 1: between the attention and MLP blocks each TP rank
            # holds its share of the sequence (activations / TP; the same arithmetic); megatron-core's
            # MoE layer requires it
            sequence_parallel=tp > 1,
            params_dtype=params_dtype, pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
            use_cpu_initialization=use_cpu_initialization,  # initialization also sets the TP attributes
            mrope_section=list(text.rope_parameters["mrope_section"]),
            apply_rope_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
            persist_layer_norm=False, gradient_accumulation_fusion=False, variable_seq_lengths=True,
            moe_token_dispatcher_type="alltoall",  # (dense model) the default rejects variable lengths
        )
        if self.moe:
            kwargs.update(moe_config(text, ep, moe_aux_loss_coeff, etp))
        if self.hybrid_linear_attention:
            kwargs.update(hybrid_config(text))
        if not random_init:
            kwargs.update(init_method=_skip_init, output_layer_init_method=_skip_init,
                          embedding_init_method=_skip_init)
        if fp8 is not None:
            kwargs.update(fp8="hybrid" if fp8 == "delayed" else "e4m3",
                          fp8_recipe="delayed" if fp8 == "delayed" else "blockwise")
        return TransformerConfig(**kwargs)


def moe_config(text, ep: int, aux_loss_coeff: float = 0.0, etp: int = 1) -> dict:
    """megatron-core's MoE fields for a Qwen3 MoE text config (docs/models.md). The router is
    transformers': softmax over the experts, the top k, renormalized to sum to 1, which is
    megatron's softmax score function taken after the top-k selection (``moe_router_pre_softmax``
    off: softmax over the k chosen logits). The experts split over ``ep`` ranks, each expert's
    MLP over ``etp`` ranks (``parallel.expert_tensor_parallel``; 1: whole, and at TP > 1 the
    expert-parallel ranks span the TP ranks too). No auxiliary load-balancing loss: RL fine-tuning
    keeps the router of the pretrained model, as the anchors do (verl and slime's Qwen3 MoE RL
    recipes set the aux loss coefficient to 0), and a balancing term would pull the policy away
    from the engine's routing, the largest source of train/rollout mismatch in MoE models.
    ``aux_loss_coeff > 0`` (``model.moe_aux_loss_coeff``) adds megatron's switch-style
    load-balancing loss with that coefficient (e.g. for SFT on a new task mix).
    Experts run sequentially (one local MLP each) without grouped GEMM: the CPU path. A shared
    expert (Qwen3.5-MoE: ``shared_expert_intermediate_size``) is megatron's ``SharedExpertMLP``
    with its sigmoid gate, added to every token's routed output as transformers adds it."""
    if list(getattr(text, "mlp_only_layers", []) or []) or getattr(text, "decoder_sparse_step", 1) != 1:
        raise ValueError("only models whose every decoder layer is a mixture of experts are supported "
                         f"(mlp_only_layers={text.mlp_only_layers}, decoder_sparse_step={text.decoder_sparse_step})")
    shared = getattr(text, "shared_expert_intermediate_size", None)
    shared_expert = dict(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True) if shared else {}
    return dict(**shared_expert, num_moe_experts=text.num_experts, moe_router_topk=text.num_experts_per_tok,
                moe_ffn_hidden_size=text.moe_intermediate_size, moe_router_score_function="softmax",
                moe_router_pre_softmax=False, moe_aux_loss_coeff=aux_loss_coeff,
                moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
                moe_grouped_gemm=False, moe_token_dispatcher_type="alltoall", expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp,
                moe_router_dtype="fp32")


def hybrid_config(text) -> dict:
    """megatron-core's fields for Qwen3.5's hybrid decoder (docs/models.md): the per-layer pattern
    (1 = Gated DeltaNet, 0 = full attention) from ``layer_types``, the Gated DeltaNet sizes, the
    full-attention layers' output gate (``sigmoid(gate) * attention`` before ``o_proj``), and
    zero-centered norm weights."""
    pattern = [{"linear_attention": 1, "full_attention": 0}.get(kind) for kind in text.layer_types]
    if None in pattern:
        raise ValueError(f"text_config.layer_types: unknown layer type in {text.layer_types} "
                         "(expected linear_attention or full_attention)")
    return dict(experimental_attention_variant="gated_delta_net", linear_attention_freq=pattern,
                linear_conv_kernel_dim=text.linear_conv_kernel_dim, linear_key_head_dim=text.linear_key_head_dim,
                linear_value_head_dim=text.linear_value_head_dim, linear_num_key_heads=text.linear_num_key_heads,
                linear_num_value_heads=text.linear_num_value_heads, attention_output_gate=True,
                layernorm_zero_centered_gamma=True)


def _skip_init(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _import_model_class(family: str, name: str):
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module, name)


def layer_spec(config, use_transformer_engine: Optional[bool] = None):
    """Transformer Engine layers when TE is importable (FP8-capable), the local spec otherwise
    (this stage's layers and final norm, with norms that take sequence parallelism). Hybrid
    models (``config.linear_attention_freq``) get a Gated DeltaNet layer where the pattern says 1."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if config.experimental_attention_variant == "gated_delta_net":
        return _hybrid_spec(config, use_transformer_engine)
    experts = config.num_moe_experts
    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=experts is not None,
                                                          qk_layernorm=config.qk_layernorm)
    return TransformerBlockSubmodules(layer_specs=[_local_layer_spec(config)] * get_num_layers_to_build(config),
                                      layer_norm=RMSNorm)


def _local_layer_spec(config) -> ModuleSpec:
    """megatron-core's local GPT layer with the SDPA core attention and sequence-parallel norms."""
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                    normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    layer = spec.submodules
    layer.self_attention.submodules.core_attention = _sdpa_attention_class()
    layer.input_layernorm = layer.pre_mlp_layernorm = RMSNorm
    if config.qk_layernorm:
        layer.self_attention.submodules.q_layernorm = layer.self_attention.submodules.k_layernorm = RMSNorm
    return spec


def _hybrid_spec(config, use_transformer_engine: bool) -> TransformerBlockSubmodules:
    """This stage's layers of a Gated DeltaNet / full-attention hybrid (Qwen3.5). With TE,
    megatron-core's own hybrid block spec; locally, the local layer for full attention and,
    for the linear layers, :class:`~megatron_ivr.model_providers.gated_delta_net.QwenGatedDeltaNet`
    with megatron's tensor-parallel linears. Either way the Gated DeltaNet is ours (packed rows)
    and its output norm is :class:`UncenteredRMSNorm`."""
    if use_transformer_engine:
        block = get_transformer_block_with_experimental_attention_variant_spec(config)
        for spec in block.layer_specs:
            attention = spec.submodules.self_attention
            if isinstance(attention.submodules, GatedDeltaNetSubmodules):
                attention.module = QwenGatedDeltaNet
                attention.submodules.out_norm = UncenteredRMSNorm
        return block
    full = _local_layer_spec(config)
    linear = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm,
        self_attention=ModuleSpec(module=QwenGatedDeltaNet, submodules=GatedDeltaNetSubmodules(
            in_proj=ColumnParallelLinear, out_norm=UncenteredRMSNorm, out_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add, pre_mlp_layernorm=RMSNorm, mlp=full.submodules.mlp,
        mlp_bda=get_bias_dropout_add))
    offset = get_transformer_layer_offset(config)
    pattern = config.linear_attention_freq[offset:offset + get_num_layers_to_build(config)]
    return TransformerBlockSubmodules(layer_specs=[linear if kind == 1 else full for kind in pattern],
                                      layer_norm=RMSNorm)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, as megatron-core's local spec builds it (``WrappedTorchNorm``, which
    refuses sequence parallelism), with sequence parallelism: its weight is then marked
    ``sequence_parallel``, and megatron's ``finalize_model_grads`` sums its gradient over the
    tensor-parallel ranks, each of which normalized its own share of the sequence (or, for
    per-head norms, its own heads).

    With ``config.layernorm_zero_centered_gamma`` (Qwen3.5) the weight is stored centered on
    zero and the output is ``x / rms(x) * (1 + w)``, computed in fp32 and cast back, as
    transformers' ``Qwen3_5RMSNorm``."""

    zero_centered_config = True  # whether config.layernorm_zero_centered_gamma applies to this norm

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
        self.zero_centered = self.zero_centered_config and config.layernorm_zero_centered_gamma
        if self.zero_centered:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered:
            return super().forward(x)
        normed = F.rms_norm(x.float(), self.normalized_shape, eps=self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class UncenteredRMSNorm(RMSNorm):
    """The Gated DeltaNet output norm, ``w * x / rms(x)``, in models whose other norms are
    zero-centered (transformers' ``Qwen3NextRMSNormGated``: its weight starts at one)."""

    zero_centered_config = False


def _sdpa_attention_class():
    """megatron-core's local ``DotProductAttention`` with its core computed by PyTorch's fused
    ``scaled_dot_product_attention`` (same scale, same mask: True = blocked), instead of
    baddbmm + masked fill (-10000) + softmax + bmm over a materialized ``[B, h, S, S]``. A
    :class:`~megatron_ivr.model_providers.block_attention.BlockMask` (packed rows) is computed block by
    block; megatron's own path gets its dense mask."""
    class SdpaDotProductAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            blocks = attention_mask if isinstance(attention_mask, BlockMask) else None
            if blocks is not None:
                attention_mask = blocks.dense
            thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
            if thd and attention_bias is None and self.softmax_offset is None:
                # megatron's attention squeezed the batch: query/key/value [T, h, d]
                query, key, value, attention_mask = (query[:, None], key[:, None], value[:, None],
                                                     _cached_thd_mask(packed_seq_params, query.shape[0]))
            elif packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                       packed_seq_params)
            repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if repeat > 1:
                key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
            dropout = self.attention_dropout.p if self.training else 0.0
            if blocks is not None:
                context = block_attention(query, key, value, blocks, self.softmax_scale, dropout)
                return context.reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attention_mask is None else ~attention_mask,
                dropout_p=dropout, scale=self.softmax_scale,
                is_causal=attention_mask is None)
            return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], self.hidden_size_per_partition)

    return SdpaDotProductAttention


def thd_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``[1, 1, T, T]`` (True = blocked): each token sees the earlier tokens of its own
    sequence, the visibility Transformer Engine's THD attention gives from ``cu_seqlens``."""
    position = torch.arange(length, device=cu_seqlens.device)
    sequence = torch.bucketize(position, cu_seqlens[1:].to(position.dtype), right=True)
    allowed = (sequence[:, None] == sequence[None, :]) & (position[:, None] >= position[None, :])
    return ~allowed[None, None]


def _cached_thd_mask(packed_seq_params, length: int) -> torch.Tensor:
    """:func:`thd_mask` of a forward's ``PackedSeqParams``, built by its first layer and kept on
    that object for the others (one ``PackedSeqParams`` per forward, ``thd_params``)."""
    mask = getattr(packed_seq_params, "_local_thd_mask", None)
    if mask is None or mask.shape[-1] != length:
        mask = thd_mask(packed_seq_params.cu_seqlens_q, length)
        packed_seq_params._local_thd_mask = mask
    return mask


def token_alignment(fp8: Optional[str], tp: int = 1) -> int:
    """How many tokens a row is padded to a multiple of: FP8 GEMMs of Transformer Engine need
    the token dimension aligned (megatron-core's ``get_fp8_align_size``: 16, 32 for MXFP8), and
    sequence parallelism (MoE at TP > 1) splits each row's tokens evenly over the ``tp``
    ranks. Right padding changes no real token's output (causal attention; packed rows mask it
    or give it a sequence of its own)."""
    fp8_align = 1 if fp8 is None else get_fp8_align_size(Fp8Recipe(fp8))
    return math.lcm(fp8_align, tp)


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _megatron_module():
    return MegatronModule


class QwenVLModel(_megatron_module()):
    """One pipeline stage of a Qwen-VL model (the whole model when PP = 1).

    ``forward`` takes right-padded ``input_ids [B, S]``, ``position_ids [3, B, S]`` (see
    :func:`position_ids`), a causal ``attention_mask`` and, on the first stage, the
    processor's ``pixel_values`` / ``image_grid_thw``; it returns vocab-parallel logits
    ``[B, S, V / tp]`` on the last stage and hidden states ``[S, B, H]`` elsewhere.
    """

    def __init__(self, family: QwenVLFamily, hf_config, config, spec, pre_process: bool = True,
                 post_process: bool = True, vision_attn_implementation: str = "sdpa"):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.family, self.hf_config = family, hf_config
        self.pre_process, self.post_process = pre_process, post_process
        text = family.language_config(hf_config)
        self.image_token_id = hf_config.image_token_id
        self.vocab_size = text.vocab_size
        self.language = GPTModel(
            config, spec, vocab_size=text.vocab_size, max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process, post_process=post_process, parallel_output=True,
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            position_embedding_type="mrope", rotary_base=text.rope_parameters["rope_theta"],
            scatter_embedding_sequence_parallel=False,  # embed() scatters, after the image features are in
        )
        # Qwen's MRoPE layouts replace megatron's contiguous-only MultimodalRotaryEmbedding; with
        # partial rotary (Qwen3.5) the first rotary_percent of each head turns, the rest passes
        rotary_dim = int(config.kv_channels * text.rope_parameters.get("partial_rotary_factor", 1.0))
        self.language.rotary_pos_emb = QwenMRoPE(rotary_dim, text.rope_parameters["rope_theta"],
                                                 config.mrope_section, family.mrope_layout)
        self.vision = None
        if pre_process:
            vision_class = family.transformers_class(family.vision_class)
            vision_config = hf_config.vision_config
            vision_config._attn_implementation = vision_attn_implementation
            from transformers.initialization import no_init_weights

            with no_init_weights():  # weights come from a checkpoint
                self.vision = vision_class._from_config(vision_config, dtype=config.params_dtype)
            for param in self.vision.parameters():  # replicated on TP ranks: count once in norms
                param.tensor_model_parallel = False
        # MoE: a hook in each router's replay slot (routing replay, router statistics: routing.py)
        self.router_hooks = install_router_hooks(self.language.decoder.layers) if family.moe else []
        if family.moe:
            self._mark_expert_parameters()
        self._deepstack: Optional[tuple[torch.Tensor, list[torch.Tensor]]] = None
        self.deepstack_layers = 0
        if family.deepstack:
            self.deepstack_layers = len(hf_config.vision_config.deepstack_visual_indexes)
            self._install_deepstack_hooks()

    def _mark_expert_parameters(self) -> None:
        """Every expert weight is reduced over megatron's expert-data-parallel group, also at
        expert parallel 1. megatron-core marks expert weights as dense (``allreduce``: reduced
        over the data-parallel group) unless ``expert_model_parallel_size > 1``, which holds when
        experts are split like the dense layers (expert TP = TP). With experts whole on each rank
        (expert TP 1) at TP > 1, every TP rank holds a replica that saw only its share of the
        sequence, and the replicas are the expert-data-parallel group, not the data-parallel one."""
        for module in self.language.decoder.layers:
            for param in module.mlp.experts.parameters():
                param.allreduce = False

    # --- pipeline plumbing -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads looks these up on the unwrapped model to sum the
    # gradients of tied embeddings across the first and last pipeline stages
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language.shared_embedding_or_output_weight()

    @property
    def row_alignment(self) -> int:
        """The multiple this stage's rows must be padded to (:func:`token_alignment` of its own
        FP8 recipe and sequence-parallel split), for callers that build batches themselves."""
        config = self.config
        return token_alignment(config.fp8_recipe if config.fp8 else None,
                               config.tensor_model_parallel_size if config.sequence_parallel else 1)

    def layer_offset(self) -> int:
        """Global index of this stage's first decoder layer."""
        layers = self.language.decoder.layers
        return layers[0].layer_number - 1 if len(layers) else 0

    # --- deepstack (Qwen3-VL) ------------------------------------------------------------
    def _install_deepstack_hooks(self) -> None:
        offset = self.layer_offset()
        for local, layer in enumerate(self.language.decoder.layers):
            global_index = offset + local
            if global_index < self.deepstack_layers:
                if not self.pre_process:
                    raise ValueError(
                        f"deepstack feeds decoder layer {global_index}, which is not on the first pipeline "
                        "stage; use fewer pipeline stages or an uneven split with more first-stage layers")
                layer.register_forward_hook(self._deepstack_hook(global_index))

    def _deepstack_hook(self, index: int):
        def hook(module, args, output):
            if self._deepstack is None:
                return output
            mask, features = self._deepstack  # mask [B, S] of image positions, features[index] [N, H]
            hidden = output[0] if isinstance(output, tuple) else output
            if self.config.sequence_parallel:  # this rank holds a share of the sequence: add that share
                added = torch.zeros((mask.shape[1], mask.shape[0], hidden.shape[-1]), dtype=hidden.dtype,
                                    device=hidden.device)
                added.transpose(0, 1)[mask] = features[index].to(hidden.dtype)
                hidden = hidden + tensor_parallel.scatter_to_sequence_parallel_region(added)
            else:
                hidden = hidden.clone()
                seq_first = hidden.transpose(0, 1)  # [B, S, H] view
                seq_first[mask] = seq_first[mask] + features[index].to(hidden.dtype)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        return hook

    # --- forward --------------------------------------------------------------------------
    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_mask=None):
        """Word embeddings ``[S, B, H]`` with image features scattered into image positions.
        ``image_mask [B, S]`` says which positions are image placeholders (the processor's
        ``mm_token_type_ids == 1``); without it, every ``<|image_pad|>`` id is one, which is
        wrong when a sampled response contains that token. With sequence parallelism, this
        tensor-parallel rank's share of the sequence, ``[S / tp, B, H]``."""
        embeddings = self.language.embedding(input_ids=input_ids, position_ids=None)
        self._deepstack = None
        if pixel_values is not None:
            embeddings = self._merge_images(embeddings, input_ids, pixel_values, image_grid_thw, image_mask)
        if self.config.sequence_parallel:  # each TP rank keeps its share of the sequence
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def _merge_images(self, embeddings, input_ids, pixel_values, image_grid_thw, image_mask):
        output = self.vision(pixel_values.to(self.config.params_dtype), grid_thw=image_grid_thw, return_dict=True)
        features = output.pooler_output
        mask = input_ids == self.image_token_id if image_mask is None else image_mask.bool()
        # checked on the device, without a read-back (collate checks the same counts on the host first)
        torch._assert_async(mask.sum() == features.shape[0], "image tokens and image features differ in number")
        embeddings = embeddings.clone()
        batch_first = embeddings.transpose(0, 1)
        batch_first[mask] = features.to(embeddings.dtype)
        if self.family.deepstack:
            self._deepstack = (mask, list(output.deepstack_features))
        return embeddings

    def forward(self, input_ids, position_ids, attention_mask, pixel_values=None, image_grid_thw=None,
                image_mask=None, cu_seqlens=None, max_seqlen=None, routing: Optional[RoutingTargets] = None):
        """``cu_seqlens`` (THD packing: one row, ``B = 1``): the boundaries of the sequences
        in the row, ending at its length; ``attention_mask`` is then None. ``max_seqlen``: the
        longest of them when the caller knows it on the host (else read from ``cu_seqlens``).
        ``routing`` (MoE): the engine's expert choices to replay or compare with, and which
        tokens the router statistics count (routing.py)."""
        tp = self.config.tensor_model_parallel_size
        if self.config.sequence_parallel and input_ids.shape[1] % tp:
            raise ValueError(f"rows of {input_ids.shape[1]} tokens do not split over {tp} tensor-parallel ranks "
                             f"(sequence parallelism): pad them to a multiple of {tp} (token_alignment)")
        decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, image_mask) if self.pre_process else None
        set_targets(self.router_hooks, routing, self.layer_offset(), input_ids.shape[1])
        try:
            return self.language(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                 decoder_input=decoder_input,
                                 packed_seq_params=thd_params(cu_seqlens, max_seqlen))
        finally:
            self._deepstack = None
            set_targets(self.router_hooks, None, 0, 0)


def thd_params(cu_seqlens: Optional[torch.Tensor], max_seqlen: Optional[int] = None):
    """megatron-core's ``PackedSeqParams`` in THD format for one packed row (None: none).

    The boundaries must end at the row's length (``batching.thd_boundaries``): megatron's THD
    rotary embedding then takes each token's own angle from the ``[T, 1, 1, d]`` MRoPE angles
    (its "exact mapping"); otherwise it would re-count 0, 1, 2, ... inside each sequence,
    which is wrong for image tokens (the MRoPE packing bug of peers)."""
    if cu_seqlens is None:
        return None
    longest = max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def causal_mask(seq_length: int, device=None) -> torch.Tensor:
    """megatron-core's attention mask convention: True where attention is *not* allowed."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1)[None, None]


def position_ids(family: QwenVLFamily, hf_config, input_ids, attention_mask, mm_token_type_ids,
                 image_grid_thw=None) -> torch.Tensor:
    """``[3, B, S]`` MRoPE positions, computed by transformers' own ``get_rope_index`` (text
    tokens count up; image tokens get (t, h, w) grid positions)."""
    holder = _rope_index_holder(family, hf_config)
    positions, _ = holder.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                         image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return positions


_HOLDERS: dict = {}


def _rope_index_holder(family: QwenVLFamily, hf_config):
    """An uninitialized transformers base model carrying only ``config``: enough to call its
    ``get_rope_index`` without building any weights."""
    key = (family.name, id(hf_config))
    if key not in _HOLDERS:
        cls = family.transformers_class(family.hf_base_model_class)
        holder = cls.__new__(cls)
        nn.Module.__init__(holder)
        holder.config = hf_config
        _HOLDERS[key] = holder
    return _HOLDERS[key]

"""The one place that maps Hugging Face Qwen-VL weights to Megatron-Core and back.

Names. The adapter speaks *canonical* Megatron names: the parameter names of
:class:`~megatron_ivr.model_providers.qwen_vl.QwenVLModel` with the **global** decoder-layer index
(``language.decoder.layers.{g}.…``) and full (unsharded) tensors. A pipeline stage's local
names convert with :func:`to_global_name` / :func:`to_local_name`; tensor-parallel shards
with :func:`shard` / :func:`unshard`.

Layouts.
- ``linear_qkv``: per query group ``g``, the group's query heads, then its key head, then its
  value head (``[ng * (q_per_group + 2) * head_dim, hidden]``), so that a contiguous
  tensor-parallel split gives each rank whole groups. Biases likewise.
- ``linear_fc1``: ``[gate; up]``; a tensor-parallel rank holds ``[gate_r; up_r]``.
- Layer norms fused into TE linears (``linear_qkv.layer_norm_weight``,
  ``linear_fc1.layer_norm_weight``) map to the same HF norms as the local spec's separate
  ``input_layernorm`` / ``pre_mlp_layernorm``.
- Tied embeddings (Qwen3-VL small models): no ``lm_head.weight`` in HF; the last stage's
  ``output_layer.weight`` is loaded from ``embed_tokens`` and never exported.
- The vision tower is the transformers module itself: ``vision.X`` is ``visual.X``.
- Qwen3.5 (a text config whose ``layer_types`` include ``linear_attention``):
  - gated full attention: HF's ``q_proj`` holds each head's query then its output gate
    (``[heads * 2 * head_dim, hidden]``); ``linear_qkv`` holds per query group the group's
    queries, then their gates, then the key and the value head (megatron's
    ``attention_output_gate`` layout);
  - Gated DeltaNet: ``in_proj = [in_proj_qkv; in_proj_z; in_proj_b; in_proj_a]`` and
    ``conv1d = [q; k; v]`` channels; a tensor-parallel rank holds its share of each section
    (``param.tp_sections``, set by ``gated_delta_net.QwenGatedDeltaNet``); ``A_log``, ``dt_bias``
    and ``conv1d`` split by head / channel, ``out_norm`` (HF ``norm``) is per head and replicated.
- Mixture of experts (Qwen3-VL-MoE): the router ``mlp.router.weight`` is HF's ``mlp.gate.weight``;
  expert ``e``'s ``linear_fc1`` (``[gate; up]``, ``[2I, H]``) and ``linear_fc2`` (``[H, I]``) are
  slices of HF's fused ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``. On disk (the
  released checkpoints, SGLang's loader) those are ``[E, H, 2I]`` and ``[E, I, H]``; transformers
  holds them transposed in memory and its ``save_pretrained`` writes that layout. Both are read
  (told apart by shape; a square one is taken as the disk layout), exports write the disk
  layout. Canonical names carry the **global** expert index; an expert-parallel rank's local
  index converts with the ``expert_offset`` of :func:`to_global_name`.
- Qwen3.5-MoE checkpoints hold one tensor per expert instead (``mlp.experts.{e}.gate_proj``,
  ``up_proj``, ``down_proj``: the released checkpoints and transformers' ``save_pretrained``);
  its shared expert is ``mlp.shared_experts.*`` (HF ``mlp.shared_expert.*``) with the gate
  ``mlp.shared_experts.gate_weight`` (HF ``mlp.shared_expert_gate.weight``).

HF key styles: ``legacy`` (``model.layers.*``, ``visual.*``: what transformers writes for
Qwen2.5-VL) and ``nested`` (``model.language_model.layers.*``, ``model.visual.*``: Qwen3-VL).
An export uses the style of the checkpoint it came from, so servers that load by name
(SGLang) see the names they expect.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

LAYER_RE = re.compile(r"^language\.decoder\.layers\.(\d+)\.(.+)$")
EXPERT_RE = re.compile(r"^(.*mlp\.experts\.local_experts\.)(\d+)(\..+)$")
EXPERT_HF = {"linear_fc1.weight": "mlp.experts.gate_up_proj", "linear_fc2.weight": "mlp.experts.down_proj"}
# one tensor per expert (Qwen3.5-MoE): Megatron expert suffix -> (HF suffixes under mlp.experts.{e}., how)
EXPERT_HF_PER_EXPERT = {"linear_fc1.weight": (("gate_proj.weight", "up_proj.weight"), "glu"),
                        "linear_fc2.weight": (("down_proj.weight",), "copy")}
FUSED_EXPERT_TEXT_TYPES = ("qwen3_vl_moe_text",)  # the text configs whose checkpoints fuse the experts

# Megatron layer suffix -> (HF layer suffixes, how they combine)
LAYER_MAP: dict[str, tuple[tuple[str, ...], str]] = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy"),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "copy"),
    "self_attention.linear_qkv.weight": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                          "self_attn.v_proj.weight"), "qkv"),
    "self_attention.linear_qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                        "self_attn.v_proj.bias"), "qkv"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy"),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "copy"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "copy"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy"),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "copy"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy"),
    "mlp.router.weight": (("mlp.gate.weight",), "copy"),
    "mlp.shared_experts.linear_fc1.weight": (("mlp.shared_expert.gate_proj.weight",
                                             "mlp.shared_expert.up_proj.weight"), "glu"),
    "mlp.shared_experts.linear_fc2.weight": (("mlp.shared_expert.down_proj.weight",), "copy"),
    "mlp.shared_experts.gate_weight": (("mlp.shared_expert_gate.weight",), "copy"),
    # Gated DeltaNet (Qwen3.5)
    "self_attention.in_proj.layer_norm_weight": (("input_layernorm.weight",), "copy"),
    "self_attention.in_proj.weight": (("linear_attn.in_proj_qkv.weight", "linear_attn.in_proj_z.weight",
                                       "linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight"), "cat"),
    "self_attention.conv1d.weight": (("linear_attn.conv1d.weight",), "copy"),
    "self_attention.A_log": (("linear_attn.A_log",), "copy"),
    "self_attention.dt_bias": (("linear_attn.dt_bias",), "copy"),
    "self_attention.out_norm.weight": (("linear_attn.norm.weight",), "copy"),
    "self_attention.out_proj.weight": (("linear_attn.out_proj.weight",), "copy"),
}
KEY_STYLES = {
    "legacy": {"language": "model.", "vision": "visual."},
    "nested": {"language": "model.language_model.", "vision": "model.visual."},
}


class ConversionError(ValueError):
    """A checkpoint does not match the model: names the tensor and both shapes."""


def detect_key_style(hf_names: Iterable[str]) -> str:
    names = list(hf_names)
    if any(n.startswith("model.language_model.") for n in names):
        return "nested"
    if any(n.startswith("model.layers.") or n.startswith("model.embed_tokens") for n in names):
        return "legacy"
    raise ConversionError("cannot tell the Hugging Face key style: no 'model.layers.*' or "
                          "'model.language_model.*' tensors found")


def _shift_layer(name: str, shift: int) -> str:
    match = LAYER_RE.match(name)
    return name if not match else f"language.decoder.layers.{int(match.group(1)) + shift}.{match.group(2)}"


def _shift_expert(name: str, shift: int) -> str:
    match = EXPERT_RE.match(name)
    return name if not match or not shift else f"{match.group(1)}{int(match.group(2)) + shift}{match.group(3)}"


def to_global_name(local_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    return _shift_expert(_shift_layer(local_name, layer_offset), expert_offset)


def to_local_name(global_name: str, layer_offset: int, expert_offset: int = 0) -> str:
    return _shift_expert(_shift_layer(global_name, -layer_offset), -expert_offset)


def expert_index(name: str) -> Optional[int]:
    """The (global, in a canonical name) expert index of an expert weight, else None."""
    match = EXPERT_RE.match(name)
    return int(match.group(2)) if match else None


@dataclass
class QwenVLStateDictAdapter:
    num_heads: int
    num_query_groups: int
    head_dim: int
    tied_embeddings: bool
    key_style: str = "legacy"
    num_experts: int = 0  # mixture of experts: the experts per layer (0: dense)
    hidden_size: int = 0
    expert_ffn_size: int = 0  # I: each expert's intermediate size
    attention_output_gate: bool = False  # Qwen3.5: q_proj holds [query; gate] per head
    linear_in_proj_sizes: tuple[int, ...] = ()  # Qwen3.5's Gated DeltaNet: the rows of in_proj_{qkv, z, b, a}
    fused_experts: bool = True  # the checkpoint's experts: fused per layer (Qwen3-VL-MoE) or one tensor each
    # experts' canonical tensors collected until a layer's fused HF tensor is complete (to_hf)
    _pending: dict = field(default_factory=dict, repr=False)
    _read_cache: dict = field(default_factory=dict, repr=False)  # the last fused HF tensor read

    @classmethod
    def from_hf_config(cls, hf_config, key_style: str = "legacy") -> QwenVLStateDictAdapter:
        text = hf_config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        hybrid = "linear_attention" in (getattr(text, "layer_types", None) or [])
        in_proj_sizes = ()
        if hybrid:
            qk = text.linear_num_key_heads * text.linear_key_head_dim
            v = text.linear_num_value_heads * text.linear_value_head_dim
            in_proj_sizes = (2 * qk + v, v, text.linear_num_value_heads, text.linear_num_value_heads)
        return cls(text.num_attention_heads, text.num_key_value_heads, head_dim,
                   bool(getattr(hf_config, "tie_word_embeddings", False)), key_style,
                   int(getattr(text, "num_experts", 0) or 0), text.hidden_size,
                   int(getattr(text, "moe_intermediate_size", 0) or 0), hybrid, in_proj_sizes,
                   getattr(text, "model_type", "") in FUSED_EXPERT_TEXT_TYPES)

    # --- names ------------------------------------------------------------------------
    def _prefix(self, part: str) -> str:
        return KEY_STYLES[self.key_style][part]

    def hf_names(self, name: str) -> tuple[tuple[str, ...], str]:
        """HF tensors that make canonical Megatron tensor ``name``, and how they combine."""
        lang = self._prefix("language")
        if name.startswith("vision."):
            return (self._prefix("vision") + name[len("vision."):],), "copy"
        if name == "language.embedding.word_embeddings.weight":
            return (lang + "embed_tokens.weight",), "copy"
        if name == "language.decoder.final_layernorm.weight":
            return (lang + "norm.weight",), "copy"
        if name == "language.output_layer.weight":
            return (("lm_head.weight",) if not self.tied_embeddings else (lang + "embed_tokens.weight",)), "copy"
        match = LAYER_RE.match(name)
        if match and match.group(2) in LAYER_MAP:
            suffixes, how = LAYER_MAP[match.group(2)]
            return tuple(f"{lang}layers.{match.group(1)}.{s}" for s in suffixes), how
        expert = EXPERT_RE.match(match.group(2)) if match else None
        if expert and expert.group(3)[1:] in EXPERT_HF:
            if not self.fused_experts:
                suffixes, how = EXPERT_HF_PER_EXPERT[expert.group(3)[1:]]
                return tuple(f"{lang}layers.{match.group(1)}.mlp.experts.{expert.group(2)}.{s}" for s in suffixes), how
            return (f"{lang}layers.{match.group(1)}.{EXPERT_HF[expert.group(3)[1:]]}",), "expert"
        raise ConversionError(f"no Hugging Face mapping for Megatron tensor {name!r}")

    # --- tensors ------------------------------------------------------------------------
    def _qkv_split(self) -> tuple[int, int]:
        q_per_group = self.num_heads // self.num_query_groups
        return q_per_group * self.head_dim, self.head_dim

    def to_megatron(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full canonical tensor ``name``, reading HF tensors with ``read(hf_name)``."""
        hf, how = self.hf_names(name)
        if how == "expert":
            return self._expert_from_fused(name, hf[0], read)
        tensors = [read(n) for n in hf]
        if how == "copy":
            return tensors[0]
        if how == "glu":
            return torch.cat(tensors, dim=0)
        if how == "cat":
            for hf_name, tensor, rows in zip(hf, tensors, self.linear_in_proj_sizes):
                if tensor.shape[0] != rows:
                    raise ConversionError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} but the model config "
                                          f"expects ({rows}, ...) for {name}")
            return torch.cat(tensors, dim=0)
        q, k, v = tensors  # how == "qkv"
        groups = self.num_query_groups
        q_rows, kv_rows = self._qkv_split()
        gated = 2 if self.attention_output_gate else 1
        for hf_name, tensor, rows in zip(hf, (q, k, v), (gated * groups * q_rows, groups * kv_rows, groups * kv_rows)):
            if tensor.shape[0] != rows:
                raise ConversionError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} but the model config "
                                      f"expects ({rows}, ...) for {name}")
        parts = []
        if self.attention_output_gate:  # HF: per head [query; gate] -> per group [queries; gates]
            per_head = q.reshape(self.num_heads, 2, self.head_dim, *q.shape[1:])
            parts += [per_head[:, 0].reshape(groups, q_rows, *q.shape[1:]),
                      per_head[:, 1].reshape(groups, q_rows, *q.shape[1:])]
        else:
            parts.append(q.reshape(groups, q_rows, *q.shape[1:]))
        parts += [k.reshape(groups, kv_rows, *k.shape[1:]), v.reshape(groups, kv_rows, *v.shape[1:])]
        return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])

    def _expert_from_fused(self, name: str, hf_name: str, read) -> torch.Tensor:
        """Expert ``e``'s matrix out of the fused HF tensor, in either layout (module docstring)."""
        if hf_name not in self._read_cache:
            self._read_cache.clear()  # one fused tensor at a time: a layer's experts are read in a row
            self._read_cache[hf_name] = read(hf_name)
        fused = self._read_cache[hf_name]
        if fused.dim() != 3 or fused.shape[0] != self.num_experts:
            raise ConversionError(f"{hf_name}: checkpoint shape {tuple(fused.shape)}, but the model config has "
                                  f"{self.num_experts} experts: expected ({self.num_experts}, ., .)")
        hidden, ffn = self.hidden_size, self.expert_ffn_size
        canonical = (2 * ffn, hidden) if name.endswith("linear_fc1.weight") else (hidden, ffn)
        matrix = fused[expert_index(name)]
        if tuple(matrix.shape) == canonical[::-1]:  # the disk layout (also when square)
            return matrix.t().contiguous()
        if tuple(matrix.shape) == canonical:  # transformers' in-memory layout
            return matrix.contiguous()
        raise ConversionError(f"{hf_name}: checkpoint shape {tuple(fused.shape)} does not hold ({self.num_experts}, "
                              f"{canonical[1]}, {canonical[0]}) or ({self.num_experts}, {canonical[0]}, "
                              f"{canonical[1]}) for {name}")

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """HF ``(name, tensor)`` pairs of the full canonical tensor ``name``; for an expert,
        nothing until the layer's last expert of the kind arrives, then the fused tensor."""
        hf, how = self.hf_names(name)
        if how == "copy":
            return [(hf[0], tensor)]
        if how == "expert":
            experts = self._pending.setdefault(hf[0], {})
            experts[expert_index(name)] = tensor
            if len(experts) < self.num_experts:
                return []
            del self._pending[hf[0]]
            stacked = torch.stack([experts[e] for e in range(self.num_experts)])
            return [(hf[0], stacked.transpose(1, 2).contiguous())]  # the disk layout
        if how == "glu":
            gate, up = tensor.chunk(2, dim=0)
            return [(hf[0], gate.contiguous()), (hf[1], up.contiguous())]
        if how == "cat":
            return [(n, t.contiguous()) for n, t in zip(hf, tensor.split(list(self.linear_in_proj_sizes), dim=0))]
        q_rows, kv_rows = self._qkv_split()
        rest = tensor.shape[1:]
        if self.attention_output_gate:
            grouped = tensor.reshape(self.num_query_groups, 2 * q_rows + 2 * kv_rows, *rest)
            q, gate, k, v = grouped.split([q_rows, q_rows, kv_rows, kv_rows], dim=1)
            heads = (self.num_heads, 1, self.head_dim, *rest)
            q = torch.cat([q.reshape(heads), gate.reshape(heads)], dim=1)  # per head [query; gate]
        else:
            grouped = tensor.reshape(self.num_query_groups, q_rows + 2 * kv_rows, *rest)
            q, k, v = grouped.split([q_rows, kv_rows, kv_rows], dim=1)
        return [(n, t.reshape(-1, *rest).contiguous()) for n, t in zip(hf, (q, k, v))]

    def iter_hf(self, named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named:
            if name == "language.output_layer.weight" and self.tied_embeddings:
                continue
            yield from self.to_hf(name, tensor)


# --- tensor parallelism ----------------------------------------------------------------
def is_glu(name: str) -> bool:
    """A fused gate|up projection (a dense MLP's, an expert's or a shared expert's), split half by half."""
    return name.endswith("mlp.linear_fc1.weight") or (
        (".mlp.experts." in name or ".mlp.shared_experts." in name) and name.endswith("linear_fc1.weight"))


def tp_sections(name: str, param: torch.Tensor, rows: int) -> Optional[list[int]]:
    """The sections of a fused tensor of ``rows`` (full) rows that each split over the
    tensor-parallel ranks on their own (a rank holds its share of each, in order), or None.
    A GLU's ``[gate; up]`` halves; Gated DeltaNet's ``in_proj`` and ``conv1d`` (``param.tp_sections``)."""
    sections = getattr(param, "tp_sections", None)
    if sections is not None:
        return list(sections)
    if is_glu(name):
        return [rows // 2, rows // 2]
    return None


def partition_dim(param: torch.Tensor):
    """The tensor-parallel split dimension of a megatron parameter, or None if replicated."""
    if getattr(param, "tensor_model_parallel", False):
        return getattr(param, "partition_dim", 0)
    return None


def shard(name: str, full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of the full canonical tensor, laid out as megatron expects."""
    dim = partition_dim(param)
    sections = tp_sections(name, param, full.shape[0])
    if dim is None or size == 1:
        out = full
    elif sections is not None:
        if sum(sections) != full.shape[0] or any(n % size for n in sections):
            raise ConversionError(f"{name}: sections {sections} of a tensor of {full.shape[0]} rows do not each "
                                  f"split into {size}")
        out = torch.cat([part.chunk(size, dim=0)[rank] for part in full.split(sections, dim=0)], dim=0)
    else:
        if full.shape[dim] % size:
            raise ConversionError(f"{name}: dimension {dim} of size {full.shape[dim]} does not split into {size}")
        out = full.chunk(size, dim=dim)[rank]
    if tuple(out.shape) != tuple(param.shape):
        raise ConversionError(f"{name}: checkpoint gives shape {tuple(out.shape)} for this rank but the model "
                              f"expects {tuple(param.shape)} (full checkpoint tensor {tuple(full.shape)})")
    return out


def unshard(name: str, local: torch.Tensor, param: torch.Tensor, group, size: int) -> torch.Tensor:
    """The full canonical tensor from every rank's shard (all-gather over the TP group)."""
    dim = partition_dim(param)
    if dim is None or size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    sections = tp_sections(name, param, local.shape[0] * size)
    if sections is not None:
        pieces = [part.split([n // size for n in sections], dim=0) for part in parts]
        return torch.cat([torch.cat([piece[i] for piece in pieces], 0) for i in range(len(sections))], 0)
    return torch.cat(parts, dim=dim)

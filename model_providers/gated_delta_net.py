"""Qwen3.5's Gated DeltaNet layer: megatron-core's module with a forward that takes packed rows.

megatron-core 0.16.1 ships the layer (``megatron.core.ssm.gated_delta_net.GatedDeltaNet``: the
input projection ``in_proj = [q; k; v; z; b; a]`` per tensor-parallel rank, the depthwise causal
convolution over ``[q; k; v]``, ``A_log`` and ``dt_bias`` per value head, the gated output norm,
``out_proj``; tensor and sequence parallel). Its forward refuses packed sequences and ignores
the attention mask. :class:`QwenGatedDeltaNet` keeps its parameters, initialization, sharding
and checkpoint layout and replaces the forward with one that follows the rows' sequences:

- one sequence per row (right-padded; the layer is causal, so padding changes no real token):
  the whole batch at once;
- THD packing (``cu_seqlens``) and the masked packing of ``batching.py`` (a unit's shared prompt
  then its responses, :class:`~megatron_ivr.model_providers.block_attention.BlockMask`): the
  recurrence and the convolution start afresh at each unit, and every response continues from
  its prompt's final recurrent state and last ``kernel - 1`` convolution inputs, as it would
  unpacked (packed = unpacked, tested within 1e-5).

The recurrence is the gated delta rule (Yang et al., "Gated Delta Networks"; transformers'
``Qwen3_5GatedDeltaNet``), per value head ``h`` and token ``t``, with ``q, k`` L2-normalized and
``q`` scaled by ``1 / sqrt(d_k)``::

    g_t = -exp(A_log) * softplus(a_t + dt_bias),   beta_t = sigmoid(b_t)
    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
    o_t = S_t^T q_t,   y_t = RMSNorm(o_t) * silu(z_t)

Kernels: flash-linear-attention's ``chunk_gated_delta_rule`` and ``l2norm`` where installed (GPU),
else :func:`torch_chunk_gated_delta_rule`, a torch reference of the chunked rule (the algorithm
of transformers' and megatron-core's references) that computes in the inputs' precision, at
least fp32: both of those cast to fp32 whatever the input, which leaves fp64 runs no exact
reference to check packing and parity against (the decay parameters' gradients, sums of nearly
cancelling terms, come out of the fp32 rule with errors up to a few % of their largest entry);
the convolution is torch's depthwise ``conv1d`` everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.ssm import gated_delta_net as megatron_gdn
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules

from megatron_ivr.model_providers.block_attention import RecurrentUnit

try:  # the GPU kernels (flash-linear-attention)
    from fla.modules.l2norm import l2norm as _fla_l2norm
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as _fla_chunk_rule
except ImportError:
    _fla_l2norm = _fla_chunk_rule = None

__all__ = ["QwenGatedDeltaNet", "GatedDeltaNetSubmodules", "gated_delta_rule", "l2norm", "recurrent_units",
           "torch_chunk_gated_delta_rule"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum x^2 + eps)`` over the last dimension, in fp32 (transformers' and FLA's form)."""
    if _fla_l2norm is not None and x.is_cuda:
        return _fla_l2norm(x.contiguous())
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False):
    """The gated delta rule on ``[B, L, heads, d]`` inputs (``q, k`` already normalized, key heads
    already repeated to the value heads; ``g``, ``beta`` ``[B, L, heads]``); returns ``([B, L,
    heads, d_v], final state [B, heads, d_k, d_v] or None)``. FLA's kernel on a GPU with FLA,
    else :func:`torch_chunk_gated_delta_rule`."""
    if _fla_chunk_rule is not None and query.is_cuda:
        return _fla_chunk_rule(query, key, value, g=g, beta=beta, initial_state=initial_state,
                               output_final_state=output_final_state, use_qk_l2norm_in_kernel=False)
    return torch_chunk_gated_delta_rule(query, key, value, g, beta, initial_state, output_final_state)


def torch_chunk_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                                 chunk_size: int = 64):
    """The gated delta rule (module docstring) computed chunk by chunk, in the inputs' precision
    (at least fp32). Inside a chunk the ``C`` delta-rule updates are one triangular solve (the
    UT transform of DeltaNet: ``(I + tril_-1(diag(beta) K K^T * D)) U = diag(beta) V``, with
    ``D_ij = exp(G_i - G_j)`` the decay between positions ``j <= i`` and ``G`` the cumulative
    log decay since the chunk's start); between chunks the state ``S [d_k, d_v]`` carries over.
    Same algorithm as transformers' ``torch_chunk_gated_delta_rule``."""
    dtype = torch.promote_types(value.dtype, torch.float32)
    batch, length, heads, key_dim = key.shape
    query, key, value, beta, g = (t.transpose(1, 2).to(dtype) for t in (query, key, value, beta, g))
    query = query * key_dim ** -0.5
    pad = (-length) % chunk_size  # zero padding: beta = 0 and g = 0 leave the state as it was
    query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    chunks = (length + pad) // chunk_size
    query, key, value = (t.reshape(batch, heads, chunks, chunk_size, -1) for t in (query, key, value))
    beta, g = (t.reshape(batch, heads, chunks, chunk_size) for t in (beta, g))
    g = g.cumsum(-1)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=g.device).tril()
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # D (0 above the diagonal)
    k_beta = key * beta[..., None]
    system = (k_beta @ key.transpose(-1, -2)) * decay  # unitriangular solve: its diagonal counts as 1
    new_values = torch.linalg.solve_triangular(system, value * beta[..., None], upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False, unitriangular=True)
    attention = (query @ key.transpose(-1, -2)) * decay
    state = (query.new_zeros(batch, heads, key_dim, value.shape[-1]) if initial_state is None
             else initial_state.to(dtype))
    outputs = []
    for i in range(chunks):
        corrected = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outputs.append((query[:, :, i] * g[:, :, i, :, None].exp()) @ state + attention[:, :, i] @ corrected)
        to_end = (g[:, :, i, -1:] - g[:, :, i]).exp()[..., None]  # decay from each position to the chunk's end
        state = state * g[:, :, i, -1, None, None].exp() + (key[:, :, i] * to_end).transpose(-1, -2) @ corrected
    out = torch.stack(outputs, dim=2).reshape(batch, heads, -1, value.shape[-1])[:, :, :length]
    return out.transpose(1, 2).contiguous(), (state if output_final_state else None)


@contextlib.contextmanager
def _fla_check_passed():
    """megatron-core's ``GatedDeltaNet.__init__`` refuses to build without FLA, though only its
    forward (replaced here) calls FLA."""
    saved = megatron_gdn.HAVE_FLA
    megatron_gdn.HAVE_FLA = True
    try:
        yield
    finally:
        megatron_gdn.HAVE_FLA = saved


class QwenGatedDeltaNet(GatedDeltaNet):
    def __init__(self, config, submodules: GatedDeltaNetSubmodules, layer_number: Optional[int] = None,
                 pg_collection=None, **kwargs):
        with _fla_check_passed():
            super().__init__(config, submodules, layer_number=layer_number, pg_collection=pg_collection, **kwargs)
        # the fused tensors' sections, each split over the TP ranks (the state-dict adapter's shard)
        self.in_proj.weight.tp_sections = (self.qk_dim, self.qk_dim, self.v_dim, self.v_dim, self.num_value_heads,
                                           self.num_value_heads)
        self.conv1d.weight.tp_sections = (self.qk_dim, self.qk_dim, self.v_dim)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None,
                **unused):
        """``hidden_states [S(/tp), B, H]`` -> ``(output [S(/tp), B, H], bias)``, megatron's contract."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("Gated DeltaNet layers have no inference cache here: generation runs in the "
                                      "rollout engine")
        mixed, _ = self.in_proj(hidden_states)  # sequence parallel: the whole sequence from here to out_proj
        mixed = mixed.transpose(0, 1)  # [B, S, local]
        units = recurrent_units(attention_mask, packed_seq_params)
        if units is None:
            mixed_out, _ = self._mix(mixed)
        else:
            mixed_out = mixed.new_zeros(*mixed.shape[:2], self.v_dim // self.tp_size)
            for unit in units:
                self._mix_unit(mixed, mixed_out, unit)
        out, bias = self.out_proj(mixed_out.transpose(0, 1).contiguous())
        return out, bias

    def _mix_unit(self, mixed, out, unit: RecurrentUnit) -> None:
        """One packed unit: its prefix from a fresh state, then its branches (batched, right
        padded) from the prefix's final recurrent state and convolution inputs."""
        carry = None
        if len(unit.prefix):
            prefix_out, carry = self._mix(mixed[unit.row, unit.prefix][None], carry_out=bool(unit.branches))
            out[unit.row, unit.prefix] = prefix_out[0]
        if not unit.branches:
            return
        longest = max(len(branch) for branch in unit.branches)
        padded = mixed.new_zeros(len(unit.branches), longest, mixed.shape[-1])
        for i, branch in enumerate(unit.branches):
            padded[i, :len(branch)] = mixed[unit.row, branch]
        count = len(unit.branches)
        if carry is not None:
            carry = tuple(t.expand(count, *t.shape[1:]) for t in carry)
        branch_out, _ = self._mix(padded, carry_in=carry)
        for i, branch in enumerate(unit.branches):
            out[unit.row, branch] = branch_out[i, :len(branch)]

    def _mix(self, mixed: torch.Tensor, carry_in=None, carry_out: bool = False):
        """The token mixer on ``mixed [b, L, in_proj / tp]``: convolution, gated delta rule, gated
        norm. ``carry_in``: ``(recurrent state, the last kernel - 1 convolution inputs)`` to start
        from; ``carry_out``: also return them at the end. Returns ``([b, L, v / tp], carry)``."""
        batch, length, _ = mixed.shape
        tp = self.tp_size
        qkv, gate, beta, alpha = torch.split(
            mixed, [self.conv_dim_local_tp, self.v_dim // tp, self.num_v_heads_local_tp, self.num_v_heads_local_tp],
            dim=-1)
        conv_in = qkv.transpose(1, 2)  # [b, d, L]
        if carry_in is not None:
            conv_in = torch.cat([carry_in[1].to(conv_in.dtype), conv_in], dim=-1)
        history = None
        if carry_out:  # the inputs the next tokens' convolution windows reach back to (zeros before the start)
            history = F.pad(conv_in, (self.conv_kernel_dim - 1, 0))[..., -(self.conv_kernel_dim - 1):]
        conv = F.conv1d(conv_in, self.conv1d.weight, self.conv1d.bias, padding=self.conv_kernel_dim - 1,
                        groups=self.conv_dim_local_tp)[..., :conv_in.shape[-1]][..., -length:]
        qkv = self.act_fn(conv).transpose(1, 2)  # [b, L, d]
        query, key, value = torch.split(qkv, [self.qk_dim // tp, self.qk_dim // tp, self.v_dim // tp], dim=-1)
        query = l2norm(query.reshape(batch, length, -1, self.key_head_dim))
        key = l2norm(key.reshape(batch, length, -1, self.key_head_dim))
        value = value.reshape(batch, length, -1, self.value_head_dim)
        repeat = self.num_value_heads // self.num_key_heads
        if repeat > 1:  # grouped values: each key head serves `repeat` consecutive value heads
            query, key = query.repeat_interleave(repeat, dim=2), key.repeat_interleave(repeat, dim=2)
        precision = torch.promote_types(alpha.dtype, torch.float32)  # fp32 at least, as transformers
        g = -self.A_log.to(precision).exp() * F.softplus(alpha.to(precision) + self.dt_bias)
        core, state = gated_delta_rule(query, key, value, g, beta.sigmoid(),
                                       initial_state=None if carry_in is None else carry_in[0],
                                       output_final_state=carry_out)
        normed = self.out_norm(core.reshape(-1, self.value_head_dim).to(mixed.dtype))
        gated = normed * self.act_fn(gate.reshape(-1, self.value_head_dim).to(precision))
        return gated.to(mixed.dtype).reshape(batch, length, -1), (state, history) if carry_out else None


def recurrent_units(attention_mask, packed_seq_params) -> Optional[list[RecurrentUnit]]:
    """The recurrences of a batch: None for one sequence per row, else one unit per packed
    sequence (THD ``cu_seqlens``: a single row) or per packed group (a ``BlockMask``'s units)."""
    if packed_seq_params is not None:
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        device = packed_seq_params.cu_seqlens_q.device
        return [RecurrentUnit(0, torch.arange(start, end, device=device), [])
                for start, end in zip(bounds[:-1], bounds[1:]) if end > start]
    return getattr(attention_mask, "units", None)

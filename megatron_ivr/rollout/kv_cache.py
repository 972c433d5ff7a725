"""The local engine's KV cache: written in place, with one copy of a prompt shared by its samples.

Two things the default ``DynamicCache`` of transformers does not do, both measured with
torch.profiler on the tiny model's RL batch (8 prompts x 4 samples, a 180-token prompt, 64
new tokens, one CPU thread):

1. **In-place writes.** ``GrowingLayer`` writes each new token's keys and values into a
   buffer reserved for the whole generation instead of concatenating the cache with every
   token (a copy of the whole cache per token and layer: half of the decode time).
2. **A shared prompt.** After the shared prefill, the ``n`` samples of a prompt keep *one*
   copy of the prompt's keys and values (``[groups, kv_heads, prompt, dim]``) plus their own
   generated suffixes, instead of ``n`` copies. Decode attention then reads the prompt once
   per group ("cascade" attention, as in FlashInfer's shared-prefix kernels):

       s_prefix = q K_prefix^T * scale   (the n samples' queries stacked, one matmul per group)
       s_suffix = q K_suffix^T * scale   (each sample's own tokens)
       p = softmax([s_prefix, s_suffix] + mask)
       out = p_prefix V_prefix + p_suffix V_suffix

   which is the same attention as over the repeated cache (one softmax over all keys), in a
   different summation order. Decode attention was 28% of generation (0.45 ms per call,
   memory-bound on the repeated prompt).

A hybrid model's linear-attention layers (Qwen3.5's Gated DeltaNet) hold a fixed-size
convolution and recurrent state per row instead of keys and values: their cache layers are
transformers' ``LinearAttentionLayer`` s, which a shared prefill repeats per sample
(:class:`RepeatableLinearAttentionLayer`: the state is small, so it is copied, not shared).

The shared-prefix attention is registered with transformers' ``AttentionInterface`` under
``SHARED_PREFIX_ATTENTION`` and reads the active cache from a context variable set by
``attending(cache)`` around ``generate``. Every other call (prefill, the vision tower, a
layer that holds no shared prompt, no active cache) goes to transformers' SDPA unchanged.
Only a prompt can hold padding (left padding in the batch), so ``share_prompt`` keeps it as
one additive bias per group and the decode steps build no mask at all (transformers would
build a ``[B, 1, 1, P + t]`` mask per token).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SHARED_PREFIX_ATTENTION = "megatron_ivr_shared_prefix"
_ACTIVE_CACHE: contextvars.ContextVar[DynamicCache | None] = contextvars.ContextVar("kv_cache", default=None)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of a buffer with room for
    ``reserve`` more tokens: an update writes the new tokens in place instead of
    concatenating (and so copying) the whole cache. Whenever ``keys`` is no longer a view of
    the buffer (the base class's select, crop or reorder replaced it), the next update copies
    it into a new buffer once.

    With ``share_prefix``, ``batch_repeat_interleave(n)`` does not copy the cache: what it
    holds becomes the shared prefix (``prefix_keys``/``prefix_values``, one row per group of
    ``n`` samples) and ``keys``/``values`` start empty for the samples' own tokens."""

    def __init__(self, reserve: int, share_prefix: bool = False):
        super().__init__()
        self.reserve = reserve
        self.share_prefix = share_prefix
        self.prefix_keys: torch.Tensor | None = None
        self.prefix_values: torch.Tensor | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix_keys is None else self.prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled = super().get_seq_length()  # own tokens only, the shared prefix aside
        length = filled + key_states.shape[-2]
        if not self._holds(length):
            self._buffers = tuple(self._reserve(old, new, filled, length)
                                  for old, new in ((self.keys, key_states), (self.values, value_states)))
        key_buffer, value_buffer = self._buffers
        key_buffer[..., filled:length, :] = key_states
        value_buffer[..., filled:length, :] = value_states
        self.keys, self.values = key_buffer[..., :length, :], value_buffer[..., :length, :]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.prefix_keys is not None:
            raise NotImplementedError("a cache that shares a prefix cannot be repeated again")
        if not self.share_prefix or super().get_seq_length() == 0:
            return super().batch_repeat_interleave(repeats)
        self.prefix_keys, self.prefix_values = self.keys, self.values
        batch, heads, _, dim = self.keys.shape
        self.keys = self.keys.new_empty((batch * repeats, heads, 0, dim))
        self.values = self.values.new_empty((batch * repeats, heads, 0, dim))
        self._buffers = None

    def reset(self) -> None:
        self.prefix_keys = self.prefix_values = self._buffers = None
        super().reset()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.prefix_keys is not None:
            raise NotImplementedError("batch_select_indices on a cache that shares a prefix")
        super().batch_select_indices(indices)

    def crop(self, tokens_to_remove: int) -> None:
        if self.prefix_keys is not None:
            raise NotImplementedError("crop on a cache that shares a prefix")
        super().crop(tokens_to_remove)

    def _holds(self, length: int) -> bool:
        """Whether the buffer has room for ``length`` tokens and ``keys`` still views it."""
        if self._buffers is None or self._buffers[0].shape[-2] < length or self.keys.numel() == 0:
            return False
        buffer = self._buffers[0]
        return self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[:-2] == buffer.shape[:-2]

    def _reserve(self, old: torch.Tensor, new: torch.Tensor, filled: int, length: int) -> torch.Tensor:
        shape = (*new.shape[:-2], length + self.reserve, new.shape[-1])
        buffer = torch.empty(shape, dtype=new.dtype, device=new.device)
        if filled:
            buffer[..., :filled, :] = old
        return buffer


class RepeatableLinearAttentionLayer(LinearAttentionLayer):
    """transformers' cache layer of a linear-attention layer, which ``batch_repeat_interleave``
    (a shared prefill's ``n`` samples per prompt) repeats: each row's states ``n`` times."""

    def batch_repeat_interleave(self, repeats: int) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = self.conv_states[i].repeat_interleave(repeats, dim=0)
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = self.recurrent_states[i].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)


def growing_cache(model, reserve: int, share_prefix: bool = False) -> DynamicCache:
    """A ``DynamicCache`` with one layer per decoder layer of ``model``: a ``GrowingLayer`` for
    attention, a :class:`RepeatableLinearAttentionLayer` for linear attention (``layer_types``)."""
    cache = DynamicCache()
    text = model.config.get_text_config()
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    cache.layers = [RepeatableLinearAttentionLayer() if kind == "linear_attention"
                    else GrowingLayer(reserve, share_prefix) for kind in kinds[:text.num_hidden_layers]]
    cache.layer_class_to_replicate = None
    return cache


def share_prompt(cache: DynamicCache, copies: int, attention_mask: torch.Tensor) -> None:
    """After a prefill of one row per prompt, let ``copies`` samples per prompt continue from
    ``cache``: its ``GrowingLayer`` s with ``share_prefix`` keep one copy (any other layer is
    repeated). ``attention_mask [G, P]`` (1: token, 0: padding) of the prefilled tokens becomes
    ``cache.prefix_bias [G, 1, 1, P]`` (0 or -inf), which the decode steps use instead of a mask."""
    cache.batch_repeat_interleave(copies)
    cache.prefix_bias = None
    if all(isinstance(layer, GrowingLayer) and layer.prefix_keys is not None for layer in cache.layers):
        bias = torch.zeros(attention_mask.shape, dtype=cache.layers[0].prefix_keys.dtype)
        cache.prefix_bias = bias.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None, :]


@contextlib.contextmanager
def attending(cache: DynamicCache):
    """Make ``cache`` the one ``shared_prefix_attention`` reads while the block runs."""
    token = _ACTIVE_CACHE.set(cache)
    try:
        yield
    finally:
        _ACTIVE_CACHE.reset(token)


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per sample over a prompt shared by groups of samples (the
    module docstring's equations); any other call is transformers' SDPA.

    query ``[B, H, 1, D]``; key/value: the samples' own tokens ``[B, H_kv, t, D]``; the layer's
    prefix ``[G, H_kv, P, D]`` with ``B = G n``; mask ``[B, 1, 1, P + t]`` (True: attend), or
    None: then the cache's ``prefix_bias`` (if any) masks the prompts' padding.
    Returns ``[B, 1, H, D]`` as transformers' attention functions do."""
    cache = _ACTIVE_CACHE.get()
    layer_index = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_index] if cache is not None and layer_index is not None else None
    if not isinstance(layer, GrowingLayer) or layer.prefix_keys is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    prefix_keys, prefix_values = layer.prefix_keys, layer.prefix_values
    batch, heads, _, dim = query.shape
    groups, kv_heads, prefix, _ = prefix_keys.shape
    samples, per_kv = batch // groups, heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    queries = query.reshape(batch, kv_heads, per_kv, dim)  # query head h = kv head h // per_kv (repeat_kv's order)
    stacked = queries.reshape(groups, samples, kv_heads, per_kv, dim).transpose(1, 2).reshape(
        groups, kv_heads, samples * per_kv, dim)
    prefix_scores = torch.matmul(stacked, prefix_keys.transpose(-1, -2))
    bias = getattr(cache, "prefix_bias", None)
    if attention_mask is None and bias is not None:
        prefix_scores = prefix_scores + bias  # 0 or -inf: unchanged by the scale below
    prefix_scores = prefix_scores.reshape(groups, kv_heads, samples, per_kv, prefix).transpose(1, 2).reshape(
        batch, kv_heads, per_kv, prefix)
    scores = torch.cat([prefix_scores, torch.matmul(queries, key.transpose(-1, -2))], dim=-1).mul_(scale)
    if attention_mask is not None:
        mask = attention_mask.reshape(batch, 1, 1, -1)
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    probs = scores.softmax(dim=-1)
    prefix_probs = probs[..., :prefix].reshape(groups, samples, kv_heads, per_kv, prefix).transpose(1, 2).reshape(
        groups, kv_heads, samples * per_kv, prefix)
    from_prefix = torch.matmul(prefix_probs, prefix_values).reshape(groups, kv_heads, samples, per_kv, dim)
    out = from_prefix.transpose(1, 2).reshape(batch, kv_heads, per_kv, dim) + torch.matmul(probs[..., prefix:], value)
    return out.reshape(batch, 1, heads, dim), None


def shared_prefix_mask(*, q_length: int, **kwargs):
    """transformers' SDPA mask, except for a decode step over a shared prompt: None (the
    prompts' padding is in the active cache's ``prefix_bias``; no other token is masked)."""
    cache = _ACTIVE_CACHE.get()
    if q_length == 1 and getattr(cache, "prefix_bias", None) is not None:
        return None
    return sdpa_mask(q_length=q_length, **kwargs)


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_PREFIX_ATTENTION, shared_prefix_mask)

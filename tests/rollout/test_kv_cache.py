"""The local engine's KV cache: attention over one copy of a prompt shared by its samples
equals SDPA over the prompt repeated per sample."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from megatron_ivr.rollout.kv_cache import (
    GrowingLayer,
    attending,
    growing_cache,
    share_prompt,
    shared_prefix_attention,
    shared_prefix_mask,
)


class _Attention(torch.nn.Module):
    def __init__(self, layer_idx: int, groups: int):
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = layer_idx, groups, True


class _Model:
    class config:  # noqa: N801 (stands in for a transformers config)
        @staticmethod
        def get_text_config():
            return type("TextConfig", (), {"num_hidden_layers": 2})


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none", "prefix_bias"])
def test_shared_prefix_attention_equals_sdpa_over_the_repeated_cache(mask_kind):
    """3 prompts x 4 samples, 4 query heads on 2 kv heads, a 7-token prompt (left padding
    in two of them) and 5 tokens of each sample's own, written one token at a time as decode
    does: outputs within 1e-12 of SDPA over the repeated cache (float64), the padding given
    as a mask (bool or additive) or as the cache's prefix bias (no mask)."""
    torch.manual_seed(0)
    groups, samples, heads, kv_heads, dim, prompt, own = 3, 4, 4, 2, 8, 7, 5
    batch = groups * samples
    dtype = torch.float64
    cache = growing_cache(_Model, reserve=own, share_prefix=True)
    layer = cache.layers[1]
    prefix_k, prefix_v = torch.randn(groups, kv_heads, prompt, dim, dtype=dtype), torch.randn(
        groups, kv_heads, prompt, dim, dtype=dtype)
    for filled in cache.layers:
        filled.update(prefix_k, prefix_v)
    padding = torch.zeros(batch, prompt + own, dtype=torch.bool)
    if mask_kind != "none":
        padding[:samples, :2] = padding[2 * samples:, :1] = True  # left padding of prompts 0 and 2
    share_prompt(cache, samples, (~padding[::samples, :prompt]).long())
    assert layer.prefix_keys.shape[0] == groups and layer.get_seq_length() == prompt
    assert cache.prefix_bias.shape == (groups, 1, 1, prompt)
    module = _Attention(layer_idx=1, groups=heads // kv_heads)
    for step in range(own):
        k_new, v_new = (torch.randn(batch, kv_heads, 1, dim, dtype=dtype) for _ in range(2))
        keys, values = layer.update(k_new, v_new)
        assert keys.shape == (batch, kv_heads, step + 1, dim) and layer.get_seq_length() == prompt + step + 1
        query = torch.randn(batch, heads, 1, dim, dtype=dtype)
        visible = ~padding[:, None, None, :prompt + step + 1]
        mask = {"bool": visible, "none": None, "prefix_bias": None,  # the cache's bias masks the padding
                "float": torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))}[mask_kind]
        reference_mask = visible if mask_kind == "prefix_bias" else mask
        full_k = torch.cat([prefix_k.repeat_interleave(samples, 0), keys], dim=2)
        full_v = torch.cat([prefix_v.repeat_interleave(samples, 0), values], dim=2)
        want, _ = sdpa_attention_forward(module, query, full_k, full_v, reference_mask, scaling=0.3)
        with attending(cache):
            got, _ = shared_prefix_attention(module, query, keys, values, mask, scaling=0.3)
        assert got.shape == want.shape == (batch, 1, heads, dim)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_without_a_shared_prefix_or_an_active_cache_it_is_sdpa():
    """No active cache, a layer that holds no shared prompt, or a prefill (several query
    tokens): the call is transformers' SDPA, bit for bit."""
    torch.manual_seed(0)
    module = _Attention(layer_idx=0, groups=2)
    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    want, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    assert torch.equal(shared_prefix_attention(module, query, key, value, None, scaling=0.25)[0], want)
    cache = growing_cache(_Model, reserve=4, share_prefix=True)
    with attending(cache):
        assert torch.equal(shared_prefix_attention(module, query, key, value, None, scaling=0.25)[0], want)


def test_a_shared_prefix_refuses_what_it_cannot_do():
    layer = GrowingLayer(reserve=4, share_prefix=True)
    layer.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    layer.batch_repeat_interleave(3)
    for call in (lambda: layer.batch_repeat_interleave(2), lambda: layer.crop(-1),
                 lambda: layer.batch_select_indices(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="shares a prefix"):
            call()
    layer.reset()  # back to an empty layer that can share a prefix again
    assert layer.get_seq_length() == 0 and layer.prefix_keys is None
    layer.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    layer.batch_repeat_interleave(3)
    assert layer.prefix_length == 3 and layer.keys.shape == (6, 2, 0, 8)
    plain = GrowingLayer(reserve=4)  # without share_prefix: the repeat copies, as transformers' layer does
    plain.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    plain.batch_repeat_interleave(3)
    assert plain.prefix_keys is None and plain.keys.shape == (6, 2, 3, 8)


def test_decode_steps_over_a_shared_prompt_build_no_mask():
    """With an active cache that shares its prompt, a decode step's mask is None (the prefix
    bias stands in); a prefill, or no active cache, gets transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    cache = growing_cache(_Model, reserve=4, share_prefix=True)
    for layer in cache.layers:
        layer.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    share_prompt(cache, 2, torch.tensor([[0, 1, 1], [1, 1, 1]]))
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]] * 2)
    kwargs = dict(batch_size=4, kv_length=4, attention_mask=padded.bool(), allow_is_causal_skip=False)
    want = sdpa_mask(q_length=1, q_offset=3, **kwargs)
    assert want is not None and torch.equal(shared_prefix_mask(q_length=1, q_offset=3, **kwargs), want)
    with attending(cache):
        assert shared_prefix_mask(q_length=1, q_offset=3, **kwargs) is None
        prefill = dict(kwargs, kv_length=2)
        prefill["attention_mask"] = padded[:, :2].bool()
        assert torch.equal(shared_prefix_mask(q_length=2, **prefill), sdpa_mask(q_length=2, **prefill))

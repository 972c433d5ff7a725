"""Qwen3.5's Gated DeltaNet (model_providers/gated_delta_net.py): the torch reference of the
gated delta rule against a token-by-token recurrence (fp64, 1e-12) and against transformers'
own reference (fp32, 1e-5); a sequence continued from a carried state equals the sequence in
one piece; the layer's packed units (a prefix, then branches from its final state and its
last convolution inputs) equal one sequence per row, outputs and every gradient (fp64, 1e-12
relative)."""

from __future__ import annotations

import pytest
import torch

from megatron_ivr.model_providers.block_attention import BlockMask, RecurrentUnit
from megatron_ivr.model_providers.gated_delta_net import l2norm, recurrent_units, torch_chunk_gated_delta_rule
from megatron_ivr.model_providers.qwen_vl import thd_params


def rule_inputs(batch=2, length=150, heads=4, key_dim=8, value_dim=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = l2norm(torch.randn(batch, length, heads, key_dim, generator=g, dtype=dtype))
    key = l2norm(torch.randn(batch, length, heads, key_dim, generator=g, dtype=dtype))
    value = torch.randn(batch, length, heads, value_dim, generator=g, dtype=dtype)
    # decays from slow (a state that lasts the whole sequence) to fast
    decay = -torch.rand(batch, length, heads, generator=g, dtype=dtype) * torch.tensor([0.01, 0.1, 1.0, 5.0],
                                                                                       dtype=dtype)
    beta = torch.rand(batch, length, heads, generator=g, dtype=dtype)
    return query, key, value, decay, beta


def recurrence(query, key, value, g, beta, state=None):
    """S_t = exp(g_t) S + beta_t k_t (v_t - exp(g_t) S^T k_t)^T; o_t = S_t^T q_t / sqrt(d_k), token by token."""
    batch, length, heads, key_dim = key.shape
    state = query.new_zeros(batch, heads, key_dim, value.shape[-1]) if state is None else state
    outputs = []
    for t in range(length):
        state = state * g[:, t, :, None, None].exp()
        k, v, b = key[:, t], value[:, t], beta[:, t, :, None]
        delta = (v - (state * k[..., None]).sum(-2)) * b
        state = state + k[..., None] * delta[..., None, :]
        outputs.append((state * query[:, t, :, :, None]).sum(-2) * key_dim ** -0.5)
    return torch.stack(outputs, dim=1), state


def test_chunked_rule_equals_the_token_by_token_recurrence():
    inputs = rule_inputs()
    state = torch.randn(2, 4, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for initial in (None, state):
        out, final = torch_chunk_gated_delta_rule(*inputs, initial_state=initial, output_final_state=True)
        ref_out, ref_final = recurrence(*inputs, state=initial)
        assert out.dtype == torch.float64  # the inputs' precision (megatron's and transformers' cast to fp32)
        assert (out - ref_out).abs().max() <= 1e-12
        assert (final - ref_final).abs().max() <= 1e-12


def test_chunked_rule_matches_transformers_reference_in_fp32():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    query, key, value, g, beta = rule_inputs(dtype=torch.float32)
    ours, _ = torch_chunk_gated_delta_rule(query, key, value, g, beta)
    theirs, _ = torch_recurrent_gated_delta_rule(query, key, value, g=g, beta=beta, use_qk_l2norm_in_kernel=False)
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.abs().max() > 0.1


def test_a_sequence_continued_from_its_carried_state_equals_it_in_one_piece():
    inputs = rule_inputs(length=100)
    whole, whole_state = torch_chunk_gated_delta_rule(*inputs, output_final_state=True)
    split = 37
    first, state = torch_chunk_gated_delta_rule(*(t[:, :split] for t in inputs), output_final_state=True)
    second, final = torch_chunk_gated_delta_rule(*(t[:, split:] for t in inputs), initial_state=state,
                                                 output_final_state=True)
    assert (torch.cat([first, second], dim=1) - whole).abs().max() <= 1e-12
    assert (final - whole_state).abs().max() <= 1e-12
    # the state matters: continuing from a fresh state instead changes the slow heads' outputs
    fresh, _ = torch_chunk_gated_delta_rule(*(t[:, split:] for t in inputs))
    assert (fresh - whole[:, split:]).abs().max() > 1e-2


@pytest.fixture(scope="module")
def gated_delta_net(tiny_qwen3_5_model):
    """The tiny Qwen3.5's Gated DeltaNet layer in fp64, its decays slow enough that a state
    carries across a whole packed unit."""
    from megatron_ivr.config.schema import ParallelismConfig
    from megatron_ivr.model_providers.build import build_model, load_hf_weights
    from megatron_ivr.model_providers.hf_checkpoint import HFCheckpoint
    from megatron_ivr.model_providers.parallel import destroy_parallel, init_parallel

    init_parallel(ParallelismConfig())
    checkpoint = HFCheckpoint(tiny_qwen3_5_model)
    model = build_model(checkpoint.config(), dtype=torch.float64, on_gpu=False)
    load_hf_weights(model, checkpoint)
    layer = model.language.decoder.layers[0].self_attention
    with torch.no_grad():
        layer.A_log.copy_(torch.log(torch.tensor([0.02, 0.1, 0.5, 2.0])))
    yield layer
    destroy_parallel()


def test_packed_units_equal_one_sequence_per_row(gated_delta_net):
    """Two units in one row: a prompt of 7 tokens with branches of 5 and 3 tokens, then a
    sequence of 6 (and 2 tokens of padding); against the three sequences (prompt + branch)
    one per row: outputs, and every gradient of the same weighted sum over the same tokens."""
    layer = gated_delta_net
    g = torch.Generator().manual_seed(2)
    prompt, branch_a, branch_b, alone = (torch.randn(n, 64, generator=g, dtype=torch.float64) for n in (7, 5, 3, 6))
    row = torch.cat([prompt, branch_a, branch_b, alone, torch.zeros(2, 64, dtype=torch.float64)])[:, None]
    unit_id = torch.tensor([0] * 15 + [1] * 6 + [-1] * 2)[None]
    branch_id = torch.tensor([0] * 7 + [1] * 5 + [2] * 3 + [0] * 6 + [0] * 2)[None]
    mask = BlockMask.from_segments(unit_id, branch_id)
    assert [(u.prefix.tolist(), [b.tolist() for b in u.branches]) for u in mask.units] == [
        (list(range(7)), [list(range(7, 12)), list(range(12, 15))]), (list(range(15, 21)), [])]
    padded = torch.zeros(12, 3, 64, dtype=torch.float64)  # [S, B, H]: one sequence per row
    for i, seq in enumerate((torch.cat([prompt, branch_a]), torch.cat([prompt, branch_b]), alone)):
        padded[:len(seq), i] = seq
    # where each packed token sits unpacked: (position, row)
    places = [(t, 0) for t in range(12)] + [(7 + t, 1) for t in range(3)] + [(t, 2) for t in range(6)]
    weights = torch.randn(21, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    unpacked_weights = torch.zeros(12, 3, 64, dtype=torch.float64)
    for i, (t, r) in enumerate(places):
        unpacked_weights[t, r] = weights[i]

    def run(hidden, attention_mask, w):
        layer.zero_grad(set_to_none=True)
        out, _ = layer(hidden, attention_mask)
        (out[:w.shape[0]] * w.reshape(w.shape[0], -1, 64)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in layer.named_parameters()}

    packed, packed_grads = run(row, mask, weights)
    unpacked, grads = run(padded, None, unpacked_weights)
    for i, (t, r) in enumerate(places):
        assert (packed[i, 0] - unpacked[t, r]).abs().max() <= 1e-12, i
    for name, grad in grads.items():
        assert (packed_grads[name] - grad).abs().max() <= 1e-12 * grad.abs().max(), name
    # without the units (one recurrence through the whole row) branch b reads branch a, and
    # the second unit reads the first: the carry and the restarts are what make them equal
    joined, _ = run(row, None, weights)
    assert (joined[12:15, 0] - packed[12:15, 0]).abs().max() > 1e-3
    assert (joined[15:21, 0] - packed[15:21, 0]).abs().max() > 1e-3


def test_thd_boundaries_restart_the_recurrence(gated_delta_net):
    layer = gated_delta_net
    g = torch.Generator().manual_seed(4)
    first, second = torch.randn(9, 64, generator=g, dtype=torch.float64), torch.randn(5, 64, generator=g,
                                                                                    dtype=torch.float64)
    row = torch.cat([first, second])[:, None]
    with torch.no_grad():
        thd, _ = layer(row, None, packed_seq_params=thd_params(torch.tensor([0, 9, 14], dtype=torch.int32)))
        alone, _ = layer(second[:, None], None)
        joined, _ = layer(row, None)
    assert (thd[9:] - alone).abs().max() <= 1e-12
    assert (joined[9:] - alone).abs().max() > 1e-3  # one recurrence across the boundary differs
    assert recurrent_units(None, None) is None
    units = recurrent_units(None, thd_params(torch.tensor([0, 9, 14], dtype=torch.int32)))
    assert [u.prefix.tolist() for u in units] == [list(range(9)), list(range(9, 14))]


def test_conv_history_is_the_prompts_last_inputs(gated_delta_net):
    """A branch's first tokens see the prompt's last ``kernel - 1`` inputs through the
    convolution: a one-token prompt (shorter than the window) pads the history with zeros."""
    layer = gated_delta_net
    g = torch.Generator().manual_seed(6)
    prompt, branch = torch.randn(1, 64, generator=g, dtype=torch.float64), torch.randn(4, 64, generator=g,
                                                                                     dtype=torch.float64)
    unit = RecurrentUnit(0, torch.arange(1), [torch.arange(1, 5)])
    with torch.no_grad():
        mixed = layer.in_proj(torch.cat([prompt, branch])[:, None])[0].transpose(0, 1)
        out = mixed.new_zeros(1, 5, layer.v_dim)
        layer._mix_unit(mixed, out, unit)
        whole, _ = layer._mix(mixed)
    assert (out - whole).abs().max() <= 1e-12

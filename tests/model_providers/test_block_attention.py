"""Block-by-block attention over packed rows equals dense masked attention (values and
gradients), and costs fewer query-key pairs."""

import torch
import torch.nn.functional as F

from megatron_ivr.model_providers.block_attention import BlockMask, block_attention


def _segments():
    """Two rows: row 0 = a unit with a prefix of 5 and branches of 3, 1 and 4 tokens, then a
    unit with a prefix of 2 and one branch of 2, then 3 padding tokens; row 1 = one unit,
    prefix 7, branches of 6 and 2."""
    width = 5 + 3 + 1 + 4 + 2 + 2 + 3
    unit_id = torch.full((2, width), -1)
    branch_id = torch.zeros((2, width), dtype=torch.long)
    cursor = 0
    for unit, (prefix, branches) in enumerate([(5, [3, 1, 4]), (2, [2])]):
        unit_id[0, cursor:cursor + prefix] = unit
        cursor += prefix
        for b, n in enumerate(branches):
            unit_id[0, cursor:cursor + n], branch_id[0, cursor:cursor + n] = unit, b + 1
            cursor += n
    unit_id[1, :15] = 2
    branch_id[1, 7:13], branch_id[1, 13:15] = 1, 2
    return unit_id, branch_id


def _dense(q, k, v, mask, scale):
    q_, k_, v_ = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=~mask, scale=scale).permute(2, 0, 1, 3)


def test_block_attention_equals_dense_masked_attention():
    torch.manual_seed(0)
    unit_id, branch_id = _segments()
    mask = BlockMask.from_segments(unit_id, branch_id)
    rows, width = unit_id.shape
    heads, dim, scale = 3, 8, 8 ** -0.5
    q, k, v = (torch.randn(width, rows, heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weights = torch.randn(width, rows, heads, dim, dtype=torch.float64)
    real = (unit_id >= 0).T[:, :, None, None]  # row padding: nothing reads it

    blocked = block_attention(q, k, v, mask, scale)
    dense = _dense(q, k, v, mask.dense, scale)
    assert (blocked - dense)[real.expand_as(dense)].abs().max() <= 1e-12
    assert blocked[~real.expand_as(blocked)].abs().max() == 0
    grads = torch.autograd.grad((blocked * weights * real).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((dense * weights * real).sum(), (q, k, v))
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).abs().max() <= 1e-12

    # a branch that could see its sibling changes the result: the check above can fail
    leaky = BlockMask.from_segments(unit_id, torch.where(branch_id > 0, 1, 0))
    assert (block_attention(q, k, v, leaky, scale) - dense)[real.expand_as(dense)].abs().max() > 1e-3


def test_blocks_cover_every_allowed_pair_and_fewer_pairs_in_all():
    unit_id, branch_id = _segments()
    mask = BlockMask.from_segments(unit_id, branch_id)
    allowed_pairs = int((~mask.dense[:, 0] & (unit_id >= 0)[:, :, None]).sum())
    covered = sum(int(g.allowed[:, 0][g.queries >= 0].sum()) for g in mask.groups)
    assert covered == allowed_pairs  # every allowed (query, key) pair lies in exactly one block
    computed = sum(g.allowed.shape[0] * g.allowed.shape[2] * g.allowed.shape[3] for g in mask.groups)
    assert computed < unit_id.numel() * unit_id.shape[1]

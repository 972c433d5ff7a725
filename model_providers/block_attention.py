"""Attention over packed rows, computed block by block instead of over the whole row.

A packed row (``megatron_ivr.model_providers.batching``) holds units: a shared prefix (a group's
prompt) followed by branches (its responses), each branch seeing the prefix and itself. A
dense ``[B, 1, S, S]`` mask expresses that, but a fused attention kernel still computes every
query against every key of the row, and most of those pairs are masked: a group of G
responses of length R after a prompt of length P costs ``(P + G R)^2`` instead of the
``P^2 / 2 + G R (P + R)`` pairs that are allowed.

:class:`BlockMask` keeps the dense mask (for any path that needs it) and, beside it, the
same visibility cut into blocks: the prefix's queries against the prefix's keys, each branch's
queries against the prefix's and its own keys. Blocks of one kind are padded to a common
size and run as one batched ``scaled_dot_product_attention`` call; their masks are *gathered
from the dense mask* (``allowed[r, queries][:, keys]``), so a block sees exactly the keys
the dense mask allows: the softmax runs over the same set, only the masked pairs are not
computed. Tokens outside every block (row padding) get a zero output; nothing reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class BlockGroup:
    """Blocks of one kind, padded to a common size. ``queries [n, Lq]`` and ``keys [n, Lk]``
    index the row-major flattened ``[B * S]`` tokens (``-1``: padding); ``allowed [n, 1, Lq,
    Lk]`` is the dense mask's visibility on those pairs (a padded query sees its first key
    only, so that no softmax row is empty)."""

    queries: torch.Tensor
    keys: torch.Tensor
    allowed: torch.Tensor

    def to(self, device) -> BlockGroup:
        return BlockGroup(self.queries.to(device), self.keys.to(device), self.allowed.to(device))


@dataclass
class RecurrentUnit:
    """The tokens of one packed unit in row ``row``: its ``prefix`` positions (a shared prompt,
    or a whole sequence) and its ``branches``, each continuing from the prefix. Attention sees
    them through the mask; a linear-attention layer (``gated_delta_net``) runs one recurrence
    over the prefix and continues each branch from the prefix's final state."""

    row: int
    prefix: torch.Tensor
    branches: list[torch.Tensor]


@dataclass
class BlockMask:
    """An attention mask for packed rows: ``dense [B, 1, S, S]`` (True = blocked, megatron's
    convention), the same visibility as :class:`BlockGroup` s, and the rows' ``units`` (each
    unit's prefix positions and branch positions: the recurrences of linear-attention layers,
    :class:`RecurrentUnit`)."""

    dense: torch.Tensor
    groups: list[BlockGroup]
    units: list[RecurrentUnit] = field(default_factory=list)

    def to(self, device) -> BlockMask:
        units = [RecurrentUnit(u.row, u.prefix.to(device), [b.to(device) for b in u.branches]) for u in self.units]
        return BlockMask(self.dense.to(device), [group.to(device) for group in self.groups], units)

    @classmethod
    def from_segments(cls, unit_id: torch.Tensor, branch_id: torch.Tensor) -> BlockMask:
        """From per-token labels ``[B, S]``: ``unit_id`` (-1: padding) and ``branch_id`` (0: the
        unit's shared prefix, b + 1: branch b). A token sees the earlier tokens of its unit
        that are in the prefix or in its own branch."""
        rows, width = unit_id.shape
        same_unit = unit_id[:, :, None] == unit_id[:, None, :]
        visible = (branch_id[:, None, :] == 0) | (branch_id[:, :, None] == branch_id[:, None, :])
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        allowed = same_unit & visible & causal & (unit_id[:, None, :] >= 0)
        allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
        prefix_blocks, branch_blocks, units = [], [], []
        for r in range(rows):
            for unit in unit_id[r].unique().tolist():
                if unit < 0:
                    continue
                in_unit = unit_id[r] == unit
                prefix = torch.nonzero(in_unit & (branch_id[r] == 0)).flatten()
                if prefix.numel():
                    prefix_blocks.append((r, prefix, prefix))
                branches = []
                for branch in branch_id[r][in_unit].unique().tolist():
                    if branch > 0:
                        own = torch.nonzero(in_unit & (branch_id[r] == branch)).flatten()
                        branch_blocks.append((r, own, torch.cat([prefix, own])))
                        branches.append(own)
                units.append(RecurrentUnit(r, prefix, branches))
        groups = [_group(blocks, allowed, width) for blocks in (prefix_blocks, branch_blocks) if blocks]
        return cls(~allowed[:, None], groups, units)


def _group(blocks: list[tuple[int, torch.Tensor, torch.Tensor]], allowed: torch.Tensor, width: int) -> BlockGroup:
    longest_q = max(len(q) for _, q, _ in blocks)
    longest_k = max(len(k) for _, _, k in blocks)
    queries = torch.full((len(blocks), longest_q), -1, dtype=torch.long)
    keys = torch.full((len(blocks), longest_k), -1, dtype=torch.long)
    visible = torch.zeros((len(blocks), 1, longest_q, longest_k), dtype=torch.bool)
    visible[:, :, :, 0] = True
    for i, (row, q, k) in enumerate(blocks):
        queries[i, :len(q)] = row * width + q
        keys[i, :len(k)] = row * width + k
        visible[i, 0, :len(q), :len(k)] = allowed[row][q][:, k]
    return BlockGroup(queries, keys, visible)


def block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
                    scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of ``query/key/value [S, B, h, d]`` (megatron's layout, key and value already
    with the query's head count) under ``mask``, block by block; returns ``[S, B, h, d]``."""
    seq, batch, heads, dim = query.shape
    flat = [torch.cat([t.transpose(0, 1).reshape(batch * seq, heads, dim), t.new_zeros(1, heads, dim)])
            for t in (query, key, value)]  # [B*S + 1, h, d]: the last row stands in for padding
    out = query.new_zeros(batch * seq, heads, dim)
    for group in mask.groups:
        pad = batch * seq
        q, k, v = (tokens[torch.where(index >= 0, index, pad)].transpose(1, 2)  # [n, h, L, d]
                   for tokens, index in zip(flat, (group.queries, group.keys, group.keys)))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=group.allowed, dropout_p=dropout_p, scale=scale)
        valid = group.queries >= 0
        out = out.index_put((group.queries[valid],), context.transpose(1, 2)[valid])
    return out.reshape(batch, seq, heads, dim).transpose(0, 1)

"""Routing replay and router statistics of mixture-of-experts stages (docs/models.md,
"Routing replay").

A token routed to other experts in the trainer than in the engine is the largest source of
train/rollout mismatch in MoE models: the two compute the same router logits up to kernel
rounding, and a near tie between the k-th and (k+1)-th expert flips. The rollout engine
reports, per token it fed and per MoE layer, the k experts it chose
(``Completion.routed_experts``); :func:`install_router_hooks` puts a :class:`RouterHook` into
the ``router_replay`` slot of each of megatron-core's routers, which its top-k routing
(``moe_utils.topk_routing_with_score_function``) calls for the top-k selection. The hook:

- takes the router's own top-k (what the trainer routes by itself);
- counts, over the tokens whose engine choice is known, those whose *set* of k experts differs
  from the engine's (``routing/mismatch``, per layer), and the tokens per expert of the real
  (not padding) tokens (``moe/load_*``);
- in replay mode uses the engine's k experts for the tokens it knows. The routing weights are
  then the softmax over the chosen experts' *own* logits (megatron's softmax-after-top-k,
  transformers' ``norm_topk_prob``), so the router still gets its gradient through them.

Tokens the engine did not route keep the trainer's choice: the last token of each response
(never fed back), padding, and the rewritten responses of IVR-R1 (generated under another
prompt). A forward gets its targets through :class:`RoutingTargets` (``ModelBatch.model_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


@dataclass
class RoutingTargets:
    """One micro-batch's routing inputs, batch-first like its ``input_ids [B, S]``."""

    experts: Optional[torch.Tensor] = None  # [B, S, layers, k]: the engine's choice per token and layer
    known: Optional[torch.Tensor] = None  # [B, S] bool: where ``experts`` holds the engine's choice
    valid: Optional[torch.Tensor] = None  # [B, S]: real tokens (the statistics skip padding); None: all
    replay: bool = False  # route the known tokens by ``experts``
    measure: bool = True  # count this forward in the statistics

    def token_major(self, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``tensor [B, S, ...]`` restricted to sequence positions ``[start, stop)`` in the
        router's token order: its input is ``[S, B, H]`` flattened, token ``s * B + b``."""
        part = tensor[:, start:stop].transpose(0, 1)
        return part.reshape(part.shape[0] * part.shape[1], *part.shape[2:])


class RouterHook:
    """One router's replay slot and statistics (see the module docstring). ``set`` gives it
    a forward's targets; megatron calls ``get_replay_topk`` (the interface of its own
    ``RouterReplay``) with the router's scores, which here are the logits (softmax after top-k)."""

    def __init__(self, num_experts: int, sequence_parallel: bool = False):
        self.num_experts = num_experts
        self.sequence_parallel = sequence_parallel  # the router sees this TP rank's share of the sequence
        self.target: Optional[torch.Tensor] = None  # [T, k]
        self.known: Optional[torch.Tensor] = None  # [T] bool
        self.valid: Optional[torch.Tensor] = None  # [T] bool
        self.replay = False
        self.measure = False
        self.counts: Optional[torch.Tensor] = None  # [2 + E] float64: mismatched, known, tokens per expert

    def set(self, target, known, valid, replay: bool, measure: bool) -> None:
        self.target, self.known, self.valid, self.replay, self.measure = target, known, valid, replay, measure

    def clear(self) -> None:
        self.set(None, None, None, False, False)

    def reset(self) -> None:
        self.counts = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        values, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        chosen = own
        if self.replay and self.target is not None:
            known = self.known.to(scores.device)[:, None]
            chosen = torch.where(known, self.target.to(device=scores.device, dtype=own.dtype), own)
            values = scores.gather(1, chosen)
        if self.measure:
            self._count(own, chosen)
        return values, chosen

    @torch.no_grad()
    def _count(self, own: torch.Tensor, chosen: torch.Tensor) -> None:
        if self.counts is None:
            self.counts = torch.zeros(2 + self.num_experts, dtype=torch.float64, device=own.device)
        valid = self.valid.to(own.device) if self.valid is not None else torch.ones(own.shape[0], dtype=torch.bool,
                                                                                      device=own.device)
        if self.target is not None:
            known = self.known.to(own.device) & valid
            target = self.target.to(device=own.device, dtype=own.dtype)
            differs = (own.sort(-1).values != target.sort(-1).values).any(-1) & known
            self.counts[0] += differs.sum()
            self.counts[1] += known.sum()
        self.counts[2:] += torch.bincount(chosen[valid].flatten(), minlength=self.num_experts).double()


def install_router_hooks(decoder_layers) -> list[RouterHook]:
    """A :class:`RouterHook` in the replay slot of each MoE layer's router (in layer order);
    ``[]`` for a dense model."""
    hooks = []
    for layer in decoder_layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None:
            router.router_replay = RouterHook(router.config.num_moe_experts, router.config.sequence_parallel)
            hooks.append(router.router_replay)
    return hooks


def set_targets(hooks: list[RouterHook], routing: Optional[RoutingTargets], layer_offset: int,
                sequence_length: int) -> None:
    """Give each hook (this stage's layers, the first being global layer ``layer_offset``) its
    slice of ``routing``; with sequence parallelism each tensor-parallel rank routes its own
    contiguous share of the sequence."""
    if routing is None:
        for hook in hooks:
            hook.clear()
        return
    start, stop = 0, sequence_length
    if sequence_parallel_shares(hooks):
        share = sequence_length // ps.get_tensor_model_parallel_world_size()
        start = ps.get_tensor_model_parallel_rank() * share
        stop = start + share
    valid = routing.token_major(routing.valid.bool(), start, stop) if routing.valid is not None else None
    known = routing.token_major(routing.known, start, stop) if routing.known is not None else None
    experts = routing.experts
    for j, hook in enumerate(hooks):
        target = routing.token_major(experts[:, :, layer_offset + j], start, stop) if experts is not None else None
        hook.set(target, known if target is not None else None, valid, routing.replay, routing.measure)


def sequence_parallel_shares(hooks: list[RouterHook]) -> bool:
    return bool(hooks) and hooks[0].sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1


def reset_statistics(hooks: list[RouterHook]) -> None:
    for hook in hooks:
        hook.reset()


def routing_metrics(hooks: list[RouterHook], layer_offset: int, num_layers: int, num_experts: int,
                    device) -> dict:
    """The statistics the hooks counted since :func:`reset_statistics`, over every trainer rank
    (collective: ONE all-reduce): per layer the share of known tokens routed to another set of
    experts than the engine's, and the load balance (tokens of the busiest expert over the mean).
    Each token is counted once: data-parallel and expert-parallel ranks hold different tokens,
    the tensor-parallel ranks the same ones (only rank 0 counts them). ``device``: the trainer's
    (the all-reduce's backend takes tensors there)."""
    table = torch.zeros((num_layers, 2 + num_experts), dtype=torch.float64, device=device)
    if ps.get_tensor_model_parallel_rank() == 0 or sequence_parallel_shares(hooks):
        for j, hook in enumerate(hooks):
            if hook.counts is not None:
                table[layer_offset + j] = hook.counts
    dist.all_reduce(table)
    rows = table.cpu()
    out = {}
    mismatched, known = rows[:, 0], rows[:, 1]
    if known.sum() > 0:
        out["routing/mismatch"] = float(mismatched.sum() / known.sum())
        out["routing/known_tokens"] = float(known.sum() / num_layers)
        for layer in range(num_layers):
            out[f"routing/mismatch_layer{layer}"] = float(mismatched[layer] / known[layer].clamp(min=1))
    load = rows[:, 2:]
    routed = load.sum(-1)
    if routed.sum() > 0:
        imbalance = load.max(-1).values / (routed / num_experts).clamp(min=1e-12)
        out["moe/load_max_over_mean"] = float(imbalance.mean())
        out["moe/load_max_over_mean_worst_layer"] = float(imbalance.max())
        out["moe/idle_expert_share"] = float((load == 0).double().mean())
    return out

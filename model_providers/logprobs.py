"""Per-token log-probs (and entropies) of given responses under any TP x PP layout.

``run_schedule`` is the one place megatron's forward(-backward) schedule is called (the
optimizer step runs it too). Logits stay vocab-parallel: the log-softmax normalizer and the
target logit are combined across the tensor-parallel group (megatron's
``vocab_parallel_cross_entropy`` for the differentiable log-prob; a max / sum-exp all-reduce
for the entropy), so no rank ever holds full-vocabulary probabilities. With pipeline
parallelism the micro-batches run through megatron-core's schedule and the results are
broadcast from the last stage to every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ivr.model_providers.block_attention import BlockMask
from megatron_ivr.model_providers.parallel import device
from megatron_ivr.model_providers.routing import RoutingTargets


@dataclass
class ModelBatch:
    """One micro-batch as the Megatron model takes it (right-padded, batch-first)."""

    input_ids: torch.Tensor  # [B, S]
    position_ids: torch.Tensor  # [3, B, S]
    loss_mask: torch.Tensor  # [B, S]: 1 where the *next* token is a scored response token
    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    # [B, 1, S, S], True = blocked, or a BlockMask (packed rows: the same, cut into blocks); None: causal
    attention_mask: Optional[torch.Tensor | BlockMask] = None
    # where each response's scored positions are: (rows [N, T], cols [N, T]), valid where response_mask
    response_index: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    response_mask: Optional[torch.Tensor] = None  # [N, T]
    extra: dict = field(default_factory=dict)
    # THD packing (one row, B = 1): the sequences' boundaries [n + 1], int32, in place of a mask
    cu_seqlens: Optional[torch.Tensor] = None

    @property
    def targets(self) -> torch.Tensor:
        """The token each position predicts (the last position predicts padding, masked)."""
        return torch.cat([self.input_ids[:, 1:], torch.zeros_like(self.input_ids[:, :1])], dim=1)

    def responses(self, values: torch.Tensor) -> torch.Tensor:
        """``values [B, S]`` read back per response as ``[N, T]`` (zero past each response's
        end); differentiable, so losses run on the response layout however rows are packed."""
        rows, cols = self.response_index
        return values[rows, cols] * self.response_mask.to(values.dtype)

    def to(self, device) -> ModelBatch:
        """This batch on ``device``: itself when it is there already (no copy), else a copy
        with every tensor moved."""
        if self.input_ids.device == torch.device(device):
            return self

        def move(t):
            return t.to(device) if isinstance(t, (torch.Tensor, BlockMask)) else t
        index = tuple(move(t) for t in self.response_index) if self.response_index is not None else None
        return ModelBatch(move(self.input_ids), move(self.position_ids), move(self.loss_mask),
                          move(self.pixel_values), move(self.image_grid_thw), move(self.attention_mask),
                          index, move(self.response_mask), {k: move(v) for k, v in self.extra.items()},
                          move(self.cu_seqlens))

    def model_inputs(self, attention_mask_fn) -> dict:
        """Keyword arguments of ``QwenVLModel.forward`` for this batch: its own mask, the THD
        boundaries (no mask), or ``attention_mask_fn(seq_length, device=...)`` (causal)."""
        mask = self.attention_mask
        if mask is None and self.cu_seqlens is None:
            mask = attention_mask_fn(self.input_ids.shape[1], device=self.input_ids.device)
        types = self.extra.get("mm_token_type_ids")
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=mask,
                    pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw,
                    image_mask=(types == 1) if types is not None else None, cu_seqlens=self.cu_seqlens,
                    max_seqlen=self.extra.get("max_seqlen"), routing=self.routing())

    def routing(self) -> RoutingTargets:
        """What an MoE model's routers take from this batch (``routing.py``): the engine's expert
        choices where collate laid them out (``routed_experts``, ``routing_known``), replayed when
        ``routing_replay`` is set; the real tokens, which the router statistics count (unless
        ``routing_measured`` is False)."""
        extra = self.extra
        return RoutingTargets(extra.get("routed_experts"), extra.get("routing_known"), extra.get("attention_mask"),
                              replay=bool(extra.get("routing_replay", False)),
                              measure=bool(extra.get("routing_measured", True)))


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` for vocab-parallel ``logits [..., V/tp]``; differentiable.

    megatron's kernel reuses the logits' storage (it exponentiates in place): compute
    anything else from the logits (entropy) first.
    """
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the full next-token distribution from vocab-parallel logits."""
    group = ps.get_tensor_model_parallel_group()
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    exp = shifted.exp()
    sums = torch.stack([exp.sum(-1), (exp * shifted).sum(-1)])
    dist.all_reduce(sums, group=group)
    return sums[0].log() - sums[1] / sums[0]


def _logprob_report(batch: ModelBatch, with_entropy: bool, temperature: float, banned: tuple,
                    output: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The default loss of a micro-batch: the negative summed log-prob of its scored tokens, with
    the per-position log-probs (and entropies) as its report."""
    record = {}
    output = tempered(output, temperature, banned)
    if with_entropy:  # before the log-probs, which consume the logits
        record["entropy"] = vocab_parallel_entropy(output) * batch.loss_mask
    logp = vocab_parallel_logprobs(output, batch.targets) * batch.loss_mask
    record["logprobs"] = logp.detach()
    return -(logp.sum()), record


# a removed token's logit: exp() of it is 0, and 0 * it is 0 (not NaN, as with -inf, in the entropy)
REMOVED_LOGIT = -1.0e30


def tempered(logits: torch.Tensor, temperature: float, banned_token_ids: tuple = ()) -> torch.Tensor:
    """The distribution the rollouts were sampled from, as vocab-parallel logits: ``logits / T``
    (spec 2's pi_theta at the sampling temperature, as verl and slime score it) with the tokens
    the engines never sample removed (the vision placeholders, ``models/tokenizer.py``: their
    logits become ``REMOVED_LOGIT`` on the shard that holds them), which is what SGLang reports
    log-probs of and what the local engine samples from. ``T = 1`` and nothing removed returns
    the logits themselves."""
    if not banned_token_ids:
        return logits if temperature == 1.0 else logits / temperature
    shard = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    local = [i - start for i in banned_token_ids if start <= i < start + shard]
    # float32 first (the log-prob kernels would copy a bf16 tensor anyway), then in place: no
    # extra vocabulary-sized copy (the output layer's backward does not need its output)
    logits = logits.float()
    logits = logits if temperature == 1.0 else logits / temperature
    if local:
        logits.index_fill_(-1, torch.tensor(local, device=logits.device), REMOVED_LOGIT)
    return logits


LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]  # logits -> (loss, report), bound to its batch


def run_schedule(model, micro_batches: Sequence[tuple[ModelBatch, LossFn]], attention_mask_fn,
                 forward_only: bool) -> list:
    """Run the micro-batches through megatron's schedule (pipelined when PP > 1) on the trainer's
    device: forward only, or forward and backward (gradients accumulate into the parameters).
    Each micro-batch comes with its own loss function ``loss_fn(logits) -> (loss, report)``;
    ``attention_mask_fn(seq_length, device=...)`` gives the mask of a batch without its own.
    Returns the reports, one per micro-batch, on the last pipeline stage (``[]`` elsewhere).

    megatron's schedule divides each returned loss by the number of micro-batches (and DDP
    averages gradients over data-parallel ranks): see ``optimizer.global_loss_scale``."""
    micro_batches = [(batch.to(device()), loss_fn) for batch, loss_fn in micro_batches]

    def forward_step(data_iterator, stage_model):
        batch, loss_fn = next(data_iterator)
        return stage_model(**batch.model_inputs(attention_mask_fn)), loss_fn

    batches = [batch for batch, _ in micro_batches]
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=max(b.input_ids.shape[1] for b in batches),
        micro_batch_size=batches[0].input_ids.shape[0], forward_only=forward_only)


def summed_nll(batch: ModelBatch) -> LossFn:
    """The loss ``-sum log p(target)`` over ``batch``'s scored tokens (reported with its log-probs)."""
    return partial(_logprob_report, batch, False, 1.0, ())


def forward_logprobs(model, batches: list[ModelBatch], attention_mask_fn, with_entropy: bool = False,
                     temperature: float = 1.0, banned_token_ids: tuple = ()) -> list[dict]:
    """Per-position log-probs (and entropies) of ``batches`` under ``logits / temperature``
    without ``banned_token_ids`` (:func:`tempered`), forward only. Returns, on every rank, one
    record per micro-batch (``logprobs`` ``[B, S]`` and, if asked, ``entropy``), broadcast from
    the last pipeline stage."""
    batches = [batch.to(device()) for batch in batches]  # no-op for batches built on the device
    banned = tuple(banned_token_ids)
    records = run_schedule(model, [(batch, partial(_logprob_report, batch, with_entropy, temperature, banned))
                                   for batch in batches], attention_mask_fn, forward_only=True)
    return broadcast_from_last_stage(records, batches, with_entropy)


def sum_over_data_parallel(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """A report computed on the last pipeline stage (one value per data-parallel rank's share),
    reduced over the data-parallel ranks and known on every rank: ONE all-reduce over the world
    group, to which only the last stage's tensor-parallel rank 0 contributes (the other TP ranks
    hold the same values; earlier stages pass zeros of the same shape). ``op``: SUM, or MAX of
    values >= 0."""
    if not (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        values = torch.zeros_like(values)
    dist.all_reduce(values, op=op)
    return values


def broadcast_from_last_stage(records: list[dict], batches: list[ModelBatch], with_entropy: bool) -> list[dict]:
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return records
    keys = ["logprobs"] + (["entropy"] if with_entropy else [])
    last = ps.get_pipeline_model_parallel_last_rank()
    group = ps.get_pipeline_model_parallel_group()
    out = []
    for index, batch in enumerate(batches):
        record = {}
        for key in keys:
            if ps.is_pipeline_last_stage():
                tensor = records[index][key].contiguous()
            else:
                tensor = torch.empty(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
            dist.broadcast(tensor, src=last, group=group)
            record[key] = tensor
        out.append(record)
    return out

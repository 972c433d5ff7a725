"""The trainer's half of an RL step (GRPO/DAPO, with VICRA and IVR-R1 when enabled); the
step as a whole is ``RlJob.step`` in train.py.

    rank 0 (controller): experience = prompts -> rollouts -> rewards -> [IVR] -> advantages
    the experience to every trainer rank, as tensors (experience.py)
    every rank, its data-parallel share of the micro-batches (a group's responses share one
    copy of their prompt and image when ``trainer.share_prompts``; see model_providers/batching.py):
      1. one forward-only sweep: the VICRA pass without the image (or distorted) and, when
         the step makes more than one optimizer step, the old log-probs with the image
      2. reference log-probs when beta > 0 (a frozen copy of the initial policy)
      3. per micro-batch: VICRA w -> psi(w) -> per-token advantages (spec section 3)
      4. per mini-batch: forward/backward with ``rl_loss`` (global denominators), optimizer step;
         each micro-batch's loss function returns a detached report vector
      5. the reports reduced once (one SUM, one MAX all-reduce) and read back once
    the weight bridge pushes the new policy into the engine (version = step)

Old log-probs: with one optimizer step per RL step (``trainer.mini_batches = 1``) the policy
that trains *is* the old policy, so the training forward's own log-probs (detached) are the
old log-probs, exactly: no separate pass is run for them (spec 2's ratio starts at 1). With
several mini-batches they are computed before the first update, in the sweep of step 1.

Every log-prob is of ``logits / rollout.temperature`` (``logprobs.tempered``): the distribution
the rollouts were sampled from, which the engines' log-probs are of too.

Per-token tensors live in the response layout ``[N, T]`` (one row per response, whatever
the packing), which is what the loss functions take. The loss of a micro-batch is
normalized by the *global* token (or sequence) count of its mini-batch, and megatron's own
averaging over micro-batches and data-parallel ranks is undone (``global_loss_scale``), so
the gradient is that of the whole mini-batch's objective however it is split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ivr.algorithms.losses import rl_loss
from megatron_ivr.algorithms.vicra import distort_batch, prob_diff_scores, psi
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.model_providers.batching import (
    Packing,
    PromptCache,
    ScoredSequence,
    collate,
    encode_all,
    layout_stats,
    pad_responses,
    plan_layout,
)
from megatron_ivr.model_providers.logprobs import (
    forward_logprobs,
    sum_over_data_parallel,
    tempered,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from megatron_ivr.model_providers.optimizer import global_loss_scale, train_step
from megatron_ivr.model_providers.parallel import device
from megatron_ivr.model_providers.qwen_vl import causal_mask, token_alignment, transformer_engine_available
from megatron_ivr.model_providers.routing import reset_statistics, routing_metrics
from megatron_ivr.models.tokenizer import vision_token_ids
from megatron_ivr.training.experience import Experience, Trajectory

# a micro-batch's report: its loss parts, then DIAGNOSTIC_SUMS, then the largest |delta logp|
REPORT = ("loss", "kl", "clipped")
# the rollout/trainer mismatch split by how many versions behind the trainer's policy each token
# was generated (0, 1, LAG_BUCKETS - 1 or more): async rollouts hold tokens of several versions
LAG_BUCKETS = 3
DIAGNOSTIC_SUMS = ("tokens", "entropy", "on_tokens", "abs_diff", "kl", "tis_clipped", "vg", "vg_entropy",
                   "others", "other_entropy", "w", "scored",
                   *(f"{kind}_lag{b}" for b in range(LAG_BUCKETS) for kind in ("on_tokens", "abs_diff")))


@dataclass
class MicroBatch:
    """One micro-batch of trajectories with every per-response tensor the loss needs, in the
    response layout ``[N, T]`` (``mask``: valid tokens), in the order of ``indices``."""

    indices: list[int]
    batch: object  # ModelBatch with the image
    mask: torch.Tensor
    sequence_advantages: torch.Tensor  # [N]
    rectified: torch.Tensor  # [N] bool
    rollout_logp: torch.Tensor  # the engine's log-probs, [N, T]
    token_lag: torch.Tensor  # [N, T]: versions between the policy that generated each token and the trainer's
    # VICRA: the responses its no-image pass scores ([N] bool), their ModelBatch without (or with
    # distorted) images, and its log-probs in the [N, T] layout (0 on the rows not scored)
    vicra_rows: Optional[torch.Tensor] = None
    no_image: Optional[object] = None
    no_image_logp: Optional[torch.Tensor] = None
    old_logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    w: Optional[torch.Tensor] = None
    behaviour_logp: Optional[torch.Tensor] = None  # what the TIS weight divides by

    def finish(self, old_logp: torch.Tensor, entropy: torch.Tensor) -> None:
        """Everything that follows from the old log-probs: VICRA's ``w`` and the shaped
        per-token advantages (spec 3), and the behaviour log-probs of the TIS weight (spec 2;
        rectified responses were generated under another prompt: no engine log-probs)."""
        self.old_logp, self.entropy = old_logp * self.mask, entropy * self.mask
        base = self.sequence_advantages[:, None] * self.mask
        if self.vicra_rows is not None:  # w = 0 (psi = 1) on rows not scored: their advantage is 0
            self.w = torch.zeros_like(self.old_logp)
            if self.no_image_logp is not None:
                self.w = prob_diff_scores(self.old_logp, self.no_image_logp) * self.scored_mask
            self.advantages = base * psi(self.w, self.mask)
        else:
            self.advantages = base
        self.behaviour_logp = torch.where(self.rectified[:, None], self.old_logp, self.rollout_logp)

    @property
    def scored_mask(self) -> torch.Tensor:
        """``[N, T]``: the valid tokens of the responses VICRA's no-image pass scored."""
        return self.mask * self.vicra_rows[:, None].to(self.mask.dtype)

    def set_no_image_logp(self, scored_logp: torch.Tensor) -> None:
        """The no-image pass's ``[n_scored, T']`` log-probs into the ``[N, T]`` layout."""
        out = torch.zeros_like(self.mask)
        out[self.vicra_rows, :scored_logp.shape[1]] = scored_logp.to(out.dtype)
        self.no_image_logp = out


class RlStep:
    """The trainer's half of an RL step, on every rank."""

    def __init__(self, cfg: RunConfig, policy, processor, reference=None):
        self.cfg, self.policy, self.processor, self.reference = cfg, policy, processor, reference
        self.temperature = cfg.rollout.temperature  # the trajectories' sampling temperature (> 0)
        self.banned = tuple(vision_token_ids(processor.tokenizer))  # never sampled: not in the distribution
        self.token_alignment = token_alignment(cfg.parallel.fp8, cfg.parallel.tensor_parallel)  # rows padded: FP8, SP

    # --- batches --------------------------------------------------------------------------
    @property
    def on_policy(self) -> bool:
        """One optimizer step per RL step: the training forward gives the old log-probs."""
        return self.cfg.trainer.mini_batches == 1 and not self.cfg.trainer.recompute_old_logprobs

    def _micro_batches(self, trajectories: list[Trajectory], step: int
                       ) -> tuple[list[list[MicroBatch]], list[dict], dict]:
        """This rank's micro-batches per mini-batch, each mini-batch's global loss denominators,
        and batch statistics."""
        cfg, vicra, dev = self.cfg, self.cfg.algorithm.vicra, device()
        pad_id = self.processor.tokenizer.pad_token_id
        packing = Packing.from_config(cfg.trainer, transformer_engine_available())
        prompts = PromptCache(self.processor)
        items = encode_all(prompts, [ScoredSequence(t.prompt, t.images, t.response_ids, t.routed_experts)
                                     for t in trajectories])
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        groups = sorted({t.group for t in trajectories})
        mini = cfg.trainer.mini_batches
        per_mini = [set(groups[k::mini]) for k in range(mini)]  # groups dealt round-robin to mini-batches
        plans, totals = [], []
        for members in per_mini:
            chosen = [i for i, t in enumerate(trajectories) if t.group in members]
            plan = plan_layout([items[i] for i in chosen], packing, cfg.trainer.max_tokens_per_micro_batch, dp_size)
            plans.append([[chosen[j] for j in group] for group in plan])
            # the mini-batch's global loss denominators (all its responses, on every DP rank)
            totals.append({"tokens": float(sum(len(trajectories[i].response_ids) for i in chosen)),
                           "sequences": float(sum(1 for i in chosen if trajectories[i].response_ids))})
        if any(len(plan) < dp_size for plan in plans):
            raise ValueError(f"a mini-batch has fewer sequences than the {dp_size} data-parallel ranks: raise "
                             "trainer.prompts_per_step or rollout.n, or lower trainer.mini_batches")
        if vicra.enabled:  # the responses the no-image pass scores (spec 3)
            scored = [t.advantage != 0 or not vicra.skip_zero_advantage for t in trajectories]
            images = distort_batch([t.images for t in trajectories], vicra.distortion, seed=step,
                                   patch_ratio=vicra.patch_ratio, noise_std=vicra.noise_std,
                                   blur_radius=vicra.blur_radius)
            wanted = [i for i, keep in enumerate(scored) if keep]
            no_image_items = dict(zip(wanted, encode_all(prompts, [
                ScoredSequence(trajectories[i].prompt, images[i], trajectories[i].response_ids) for i in wanted])))
        out = []
        for plan in plans:
            mine = []
            for group in plan[dp_rank::dp_size]:
                batch = collate(self.policy.family, self.policy.hf_config, [items[i] for i in group], pad_id,
                                self.token_alignment, packing).to(dev)
                batch.extra["routing_replay"] = cfg.algorithm.routing_replay == "replay"
                mask = batch.response_mask
                micro = MicroBatch(
                    group, batch, mask, torch.tensor([trajectories[i].advantage for i in group], device=dev),
                    torch.tensor([trajectories[i].rectified for i in group], device=dev),
                    pad_responses([trajectories[i].rollout_logprobs for i in group], mask.shape[1]).to(dev),
                    pad_responses([[step - 1 - v for v in trajectories[i].versions()] for i in group],
                                  mask.shape[1]).long().to(dev))
                if vicra.enabled:
                    micro.vicra_rows = torch.tensor([scored[i] for i in group], device=dev)
                    rows = [i for i in group if scored[i]]
                    if rows:
                        # routed by the trainer itself and not counted in the router statistics:
                                        # how the routing depends on the image is part of what VICRA measures
                        micro.no_image = collate(self.policy.family, self.policy.hf_config,
                                                 [no_image_items[i] for i in rows], pad_id, self.token_alignment,
                                                 packing).to(dev)
                        micro.no_image.extra["routing_measured"] = False
                mine.append(micro)
            out.append(mine)
        stats = layout_stats(items, [group for plan in plans for group in plan], packing)
        stats["batch/micro_batches"] = sum(len(p) for p in plans)
        return out, totals, stats

    # --- 1 + 2: forward-only passes -------------------------------------------------------
    @torch.no_grad()
    def _score(self, minis: list[list[MicroBatch]], on_policy: bool) -> float:
        """The forward-only sweep (old log-probs unless ``on_policy``, VICRA's pass) and the
        reference pass; finishes each micro-batch whose old log-probs are known."""
        t0 = time.perf_counter()
        micros = [m for mini in minis for m in mini]
        if not on_policy:  # the router statistics of the old policy's pass with the image
            reset_statistics(self.policy.model.router_hooks)
        sweep = []
        for micro in micros:  # old log-probs and the VICRA pass share one sweep
            if not on_policy:
                sweep.append(micro.batch)
            if micro.no_image is not None:
                sweep.append(micro.no_image)
        records = iter(forward_logprobs(self.policy.forward_model, sweep, causal_mask, with_entropy=not on_policy,
                                        temperature=self.temperature, banned_token_ids=self.banned)
                       if sweep else [])
        for micro in micros:
            if not on_policy:
                record = next(records)
                old_logp, entropy = micro.batch.responses(record["logprobs"]), micro.batch.responses(record["entropy"])
            if micro.no_image is not None:
                micro.set_no_image_logp(micro.no_image.responses(next(records)["logprobs"]))
            if not on_policy:
                micro.finish(old_logp, entropy)
        if self.reference is not None:
            ref = forward_logprobs(self.reference.model, [m.batch for m in micros], causal_mask,
                                   temperature=self.temperature, banned_token_ids=self.banned)
            for micro, record in zip(micros, ref):
                micro.ref_logp = micro.batch.responses(record["logprobs"])
        return time.perf_counter() - t0

    # --- 3 + 4: train ---------------------------------------------------------------------
    def _loss(self, micro: MicroBatch, totals: dict, scale: float, logits: torch.Tensor):
        """Micro-batch ``micro``'s loss (spec 2 and 4.6, on the ``[N, T]`` response layout, global
        denominators) and its report: one detached vector, :data:`REPORT` then
        :data:`DIAGNOSTIC_SUMS` then the largest |delta logp| (nothing is read back to the host)."""
        batch = micro.batch
        logits = tempered(logits, self.temperature, self.banned)
        if micro.old_logp is None:  # on-policy: this forward is the old policy's (entropy first:
            entropy = batch.responses(vocab_parallel_entropy(logits))  # the log-probs reuse the logits)
        logp = batch.responses(vocab_parallel_logprobs(logits, batch.targets))
        if micro.old_logp is None:
            micro.finish(logp.detach(), entropy)
        loss, parts = rl_loss(logp, micro.old_logp, micro.advantages, micro.mask, self.cfg.algorithm, micro.rectified,
                              micro.ref_logp, micro.behaviour_logp, num_tokens=totals["tokens"],
                              num_sequences=totals["sequences"])
        with torch.no_grad():
            zero = torch.zeros((), device=loss.device)
            report = torch.stack([parts["loss/total"], parts.get("loss/kl", zero),
                                  parts["loss/clipped_tokens"]]).double()
            sums, peak = self._diagnostic_sums(micro)
        return loss * scale, torch.cat([report, sums, peak.reshape(1)])

    def _train(self, mini: list[MicroBatch], totals: dict) -> tuple[torch.Tensor, dict]:
        """One optimizer step on a mini-batch; returns the sum of its micro-batches' reports (this
        data-parallel rank's; zeros off the last pipeline stage) and the optimizer's numbers."""
        scale = global_loss_scale(len(mini), ps.get_data_parallel_world_size())
        self.policy.advance_lr()
        result = train_step(self.policy.ddp, self.policy.optimizer, [m.batch for m in mini], causal_mask,
                            [partial(self._loss, m, totals, scale) for m in mini])
        result["lr"] = self.policy.lr
        reports = result["reports"]
        width = len(REPORT) + len(DIAGNOSTIC_SUMS) + 1
        if not reports:  # not the last pipeline stage
            return torch.zeros(width, dtype=torch.float64, device=device()), result
        stacked = torch.stack(reports)
        return torch.cat([stacked[:, :-1].sum(0), stacked[:, -1:].max(0).values]), result

    def __call__(self, experience: Experience, step: int) -> dict:
        trajectories = experience.trajectories
        minis, totals, metrics = self._micro_batches(trajectories, step)
        metrics["time/logprob_passes"] = self._score(minis, self.on_policy)
        if self.policy.family.moe and not self.on_policy:  # counted in the sweep
            metrics.update(self._routing_metrics())
        t0 = time.perf_counter()
        if self.on_policy:  # the training forward is the old policy's pass with the image
            reset_statistics(self.policy.model.router_hooks)
        trained = [self._train(mini, mini_totals) for mini, mini_totals in zip(minis, totals)]
        metrics["time/train"] = time.perf_counter() - t0
        if self.policy.family.moe and self.on_policy:
            metrics.update(self._routing_metrics())
        metrics.update(self._reduce([report for report, _ in trained]))
        metrics.update({"optim/grad_norm": sum(r["grad_norm"] for _, r in trained) / len(trained),
                        "optim/lr": sum(r["lr"] for _, r in trained) / len(trained),
                        "optim/updated": sum(float(r["updated"]) for _, r in trained) / len(trained)})
        return metrics

    def _routing_metrics(self) -> dict:
        """Router statistics of the old policy's pass with the image (model_providers/routing.py):
        the share of tokens routed to other experts than the engine's (routing replay on) and the
        experts' load; collective."""
        model, text = self.policy.model, self.policy.hf_config.text_config
        return routing_metrics(model.router_hooks, model.layer_offset(), text.num_hidden_layers, text.num_experts,
                               device())

    @torch.no_grad()
    def _diagnostic_sums(self, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per micro-batch sums (:data:`DIAGNOSTIC_SUMS`, float64) and the largest |delta logp|,
        from its old log-probs (before any update of this step), as tensors."""
        threshold, cap = self.cfg.algorithm.vicra.grounded_threshold, self.cfg.algorithm.tis_cap
        valid = micro.mask.bool()
        on = valid & ~micro.rectified[:, None]
        diff = torch.where(on, micro.old_logp - micro.behaviour_logp, 0.0).double()  # 0 off the on-policy tokens
        entropy = micro.entropy.double()
        scored = micro.scored_mask.bool() if micro.vicra_rows is not None else torch.zeros_like(valid)
        grounded = scored & (micro.w > threshold) if micro.w is not None else torch.zeros_like(valid)
        other = scored & ~grounded
        w = micro.w.double() if micro.w is not None else torch.zeros_like(entropy)
        clipped = ((diff.exp() > cap) & on).sum() if cap is not None else torch.zeros((), device=valid.device)
        bucket = micro.token_lag.clamp(0, LAG_BUCKETS - 1)
        by_lag = [part for b in range(LAG_BUCKETS) for part in ((on & (bucket == b)).sum(),
                                                                 torch.where(bucket == b, diff.abs(), 0.0).sum())]
        sums = torch.stack([valid.sum(), (entropy * valid).sum(), on.sum(), diff.abs().sum(),
                            ((diff.exp() - diff - 1) * on).sum(), clipped, grounded.sum(), (entropy * grounded).sum(),
                            other.sum(), (entropy * other).sum(), (w * scored).sum(), scored.sum(), *by_lag]).double()
        return sums, diff.abs().max() if diff.numel() else torch.zeros((), dtype=torch.float64)

    def _reduce(self, reports: list[torch.Tensor]) -> dict:
        """The step's loss, clipping, entropy, VICRA grounding (spec 3) and rollout/trainer
        mismatch (spec 2) metrics from the mini-batches' report vectors: one SUM and one MAX
        all-reduce over the data-parallel ranks, then ONE read-back to the host (no per-token
        gather, nothing per micro-batch)."""
        stacked = torch.stack(reports)  # [mini_batches, width]
        sums = sum_over_data_parallel(stacked[:, :-1].contiguous())
        peak = sum_over_data_parallel(stacked[:, -1].max().reshape(1), op=dist.ReduceOp.MAX)
        host = torch.cat([sums.flatten(), peak]).tolist()  # the one device -> host transfer of the step
        width = sums.shape[1]
        per_mini = [dict(zip(REPORT + DIAGNOSTIC_SUMS, host[k * width:(k + 1) * width])) for k in range(len(reports))]

        def mini_mean(value) -> float:  # the loss metrics: each mini-batch's, averaged
            return sum(value(m) for m in per_mini) / len(per_mini)

        # on-policy tokens are DIAGNOSTIC_SUMS' on_tokens; the rest of the valid tokens are rectified
        out = {"loss/total": mini_mean(lambda m: m["loss"]), "loss/kl": mini_mean(lambda m: m["kl"]),
               "loss/clip_fraction": mini_mean(lambda m: m["clipped"] / max(m["on_tokens"], 1.0)),
               "loss/shaped_token_share": mini_mean(lambda m: (m["tokens"] - m["on_tokens"]) / max(m["tokens"], 1.0))}
        d = {key: sum(m[key] for m in per_mini) for key in DIAGNOSTIC_SUMS}  # the diagnostics: summed
        on_tokens = max(d["on_tokens"], 1.0)
        out.update({"policy/entropy": d["entropy"] / max(d["tokens"], 1.0),
                    "mismatch/abs_logp_diff_mean": d["abs_diff"] / on_tokens, "mismatch/abs_logp_diff_max": host[-1],
                    "mismatch/kl": d["kl"] / on_tokens, "mismatch/tis_clip_share": d["tis_clipped"] / on_tokens})
        for b in range(LAG_BUCKETS):  # by staleness: only the lags this step holds
            if d[f"on_tokens_lag{b}"]:
                label = f"lag{b}" + ("_or_more" if b == LAG_BUCKETS - 1 else "")
                out[f"mismatch/abs_logp_diff_mean_{label}"] = d[f"abs_diff_lag{b}"] / d[f"on_tokens_lag{b}"]
                out[f"mismatch/token_share_{label}"] = d[f"on_tokens_lag{b}"] / on_tokens
        if self.cfg.algorithm.vicra.enabled:
            vg_mean = d["vg_entropy"] / d["vg"] if d["vg"] else 0.0
            other_mean = d["other_entropy"] / d["others"] if d["others"] else 0.0
            scored = max(d["scored"], 1.0)
            out.update({"vicra/vg_share": d["vg"] / scored, "vicra/vg_entropy": vg_mean,
                        "vicra/other_entropy": other_mean, "vicra/entropy_gap": vg_mean - other_mean,
                        "vicra/w_mean": d["w"] / scored, "vicra/scored_share": d["scored"] / max(d["tokens"], 1.0)})
        return out

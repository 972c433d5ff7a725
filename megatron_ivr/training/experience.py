"""The controller's half of an RL step (trainer rank 0): from prompts to scored trajectories.

    draw prompts -> engine.generate (n per prompt) -> reject stale -> rewards (+ DAPO overlong
    shaping) -> [DAPO dynamic sampling: drop uniform groups, draw more] -> [IVR-R1: critique,
    rectify, verify] -> group advantages over the (mixed) groups

The result is a list of :class:`Trajectory`, each a response to its query's *response*
prompt (IVR-R1 trains rectified responses as responses to the original prompt, spec 4.6)
with its engine log-probs (for TIS and the mismatch metrics), reward and advantage. It
depends on the engine interface, the reward function and the pure algorithms only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from PIL import Image

from megatron_ivr.algorithms.advantages import group_advantages, overlong_penalty
from megatron_ivr.algorithms.dynamic_sampling import fill_batch
from megatron_ivr.algorithms.ivr import ReReasoningLoop, ScoredResponse, mixed_groups
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data.sample import Sample
from megatron_ivr.prompts import render_prompt
from megatron_ivr.rollout.engine import GenerationRequest, SamplingParams, reject_stale
from megatron_ivr.rollout.partial import ContinuingEngine
from megatron_ivr.training.sampler import EpochSampler

logger = logging.getLogger(__name__)

@dataclass
class Trajectory:
    sample_id: str
    group: int  # index of its query in this step
    prompt: str  # the response prompt (user text)
    images: list[Image.Image]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the engine's, one per response token
    reward: float
    accuracy: float
    format: float
    advantage: float = 0.0
    rectified: bool = False
    finish_reason: str = "stop"
    weight_version: int = 0  # the oldest of its tokens' versions (staleness is counted from it)
    token_versions: list[int] = field(default_factory=list)  # per response token; empty: all weight_version
    # MoE routing replay: the engine's experts per fed token and layer (``Completion.routed_experts``)
    routed_experts: Optional[torch.Tensor] = None

    def versions(self) -> list[int]:
        """The policy version that produced each response token."""
        return list(self.token_versions) if self.token_versions else [self.weight_version] * len(self.response_ids)


@dataclass
class Experience:
    trajectories: list[Trajectory]
    sample_ids: list[str]  # the queries of this step, in order
    metrics: dict = field(default_factory=dict)


@dataclass
class _Group:
    sample: Sample
    prompt: str
    responses: list[ScoredResponse]
    completions: list  # engine Completions, parallel to responses
    scores: list  # RewardResults


def step_seed(seed: int, step: int, round_index: int = 0) -> int:
    """The engine's sampling seed for a step: fixed by (seed, step), so a resumed run samples
    the same tokens as the uninterrupted one."""
    return (seed * 1_000_003 + step * 101 + round_index) % (2**31)


def refuse_vision_tokens(groups: list[list], banned: frozenset[int], token_ids=lambda c: c.token_ids
                         ) -> tuple[list[list], int]:
    """Drop every response that holds a vision placeholder token (``models/tokenizer.py``): the
    engines never sample one, and one that gets through anyway (another engine, a server without
    the mask) would make the trainer's image-token count disagree with the image features.
    Returns the kept responses per group and how many were refused (a metric)."""
    kept, refused = [], 0
    for group in groups:
        clean = [c for c in group if banned.isdisjoint(token_ids(c))]
        refused += len(group) - len(clean)
        kept.append(clean)
    if refused:
        logger.warning("refused %d response(s) holding a vision placeholder token", refused)
    return kept, refused


class ExperienceMaker:
    def __init__(self, cfg: RunConfig, engine, reward_fn, samples: list[Sample], banned_token_ids=()):
        # a push during an async generation aborts it: ContinuingEngine continues it on the new weights
        engine = engine if isinstance(engine, ContinuingEngine) else ContinuingEngine(engine)
        self.cfg, self.engine, self.reward_fn, self.samples = cfg, engine, reward_fn, samples
        self.banned = frozenset(banned_token_ids)  # vision placeholders: a response with one is refused
        self.sampler = EpochSampler(len(samples), cfg.trainer.seed)
        rollout = cfg.rollout
        # async: the trainer bounds the staleness when it takes the groups (schedule.py)
        self.max_lag = rollout.max_staleness if rollout.mode == "async" else rollout.max_weight_lag
        self.sampling = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                       top_p=rollout.top_p, n=rollout.n,
                                       return_routed_experts=cfg.algorithm.routing_replay != "off")
        self.ivr = None
        if cfg.algorithm.ivr.enabled:
            self.ivr = ReReasoningLoop(engine, reward_fn, cfg.algorithm.ivr, cfg.reward.template,
                                       rollout.max_new_tokens, rollout.temperature, rollout.top_p)

    def _sample_groups(self, count: int, step: int, round_index: int, metrics: dict, draw) -> list[_Group]:
        indices = draw(count)
        samples = [self.samples[i] for i in indices]
        prompts = [render_prompt("response", self.cfg.reward.template, question=s.question) for s in samples]
        requests = [GenerationRequest(p, s.images, s.id) for p, s in zip(prompts, samples)]
        sampling = SamplingParams(**{**self.sampling.__dict__, "seed": step_seed(self.cfg.trainer.seed, step,
                                                                                  round_index)})
        t0 = time.perf_counter()
        completions = self.engine.generate(requests, sampling)
        metrics["time/rollout"] = metrics.get("time/rollout", 0.0) + time.perf_counter() - t0
        completions, stale = reject_stale(completions, self.engine.weight_version, self.max_lag)
        metrics["rollout/stale_rejected"] = metrics.get("rollout/stale_rejected", 0) + stale
        completions, refused = refuse_vision_tokens(completions, self.banned)
        metrics["rollout/vision_token_refused"] = metrics.get("rollout/vision_token_refused", 0) + refused
        t0 = time.perf_counter()
        flat = [c for group in completions for c in group]
        answers = [s.answer for s, group in zip(samples, completions) for _ in group]
        scores = self.reward_fn([c.text for c in flat], answers) if flat else []
        rewards = [score.total for score in scores]
        if self.cfg.algorithm.overlong_shaping and flat:
            penalty = overlong_penalty(torch.tensor([c.num_tokens for c in flat]), self.cfg.rollout.max_new_tokens,
                                       self.cfg.algorithm.overlong_cache)
            rewards = [r + float(p) for r, p in zip(rewards, penalty)]
        metrics["time/reward"] = metrics.get("time/reward", 0.0) + time.perf_counter() - t0
        groups, k = [], 0
        for sample, prompt, group in zip(samples, prompts, completions):
            responses = [ScoredResponse(c.text, list(c.token_ids), rewards[k + j], list(c.logprobs))
                         for j, c in enumerate(group)]
            groups.append(_Group(sample, prompt, responses, list(group), scores[k:k + len(group)]))
            k += len(group)
        return [g for g in groups if g.responses]

    def make(self, step: int, draw=None) -> Experience:
        """Step ``step``'s experience (the engine's seed follows ``step``); ``draw(count)`` gives
        the sample indices of its prompts (the sampler's, by default)."""
        cfg = self.cfg
        draw = draw or self.sampler.draw
        metrics: dict = {}
        target = cfg.trainer.prompts_per_step
        if cfg.algorithm.dynamic_sampling:
            rounds = iter(range(cfg.algorithm.max_sampling_rounds))
            groups, ds_metrics = fill_batch(lambda k: self._sample_groups(k, step, next(rounds), metrics, draw),
                                            lambda g: [r.reward for r in g.responses], target,
                                            cfg.algorithm.max_sampling_rounds)
            metrics.update(ds_metrics)
        else:
            groups = self._sample_groups(target, step, 0, metrics, draw)
        on_policy = [g.responses for g in groups]
        rectified: list[list[ScoredResponse]] = [[] for _ in groups]
        if self.ivr is not None and groups:
            t0 = time.perf_counter()
            queries = [g.sample for g in groups]
            result = self.ivr.run(queries, on_policy)
            metrics.update(result.metrics)
            rectified, refused = refuse_vision_tokens(result.rectified, self.banned, lambda r: r.token_ids)
            metrics["rollout/vision_token_refused"] = metrics.get("rollout/vision_token_refused", 0) + refused
            metrics["time/ivr"] = time.perf_counter() - t0
        if self.ivr is not None:
            mixed = mixed_groups(on_policy, rectified, cfg.algorithm.adv_eps, cfg.algorithm.normalize_by_std)
            advantages = mixed.advantages.tolist()
        else:
            rewards = torch.tensor([r.reward for g in on_policy for r in g])
            ids = torch.tensor([gi for gi, g in enumerate(on_policy) for _ in g])
            advantages = group_advantages(rewards, ids, cfg.algorithm.adv_eps,
                                          cfg.algorithm.normalize_by_std).tolist() if len(ids) else []
        trajectories, k = [], 0
        for gi, (group, extra) in enumerate(zip(groups, rectified)):
            for j, response in enumerate(list(group.responses) + list(extra)):
                score = group.scores[j] if j < len(group.scores) else None
                completion = group.completions[j] if j < len(group.completions) else None
                trajectories.append(Trajectory(
                    sample_id=group.sample.id, group=gi, prompt=group.prompt, images=group.sample.images,
                    response_ids=response.token_ids, rollout_logprobs=response.logprobs, reward=response.reward,
                    accuracy=score.accuracy if score is not None else 1.0,
                    format=score.format if score is not None else 1.0,
                    advantage=advantages[k], rectified=response.rectified,
                    finish_reason=completion.finish_reason if completion is not None else "stop",
                    weight_version=completion.weight_version if completion is not None else self.engine.weight_version,
                    token_versions=(completion.versions() if completion is not None
                                    else [self.engine.weight_version] * len(response.token_ids)),
                    routed_experts=completion.routed_experts if completion is not None else None))
                k += 1
        metrics.update(rollout_metrics(trajectories, cfg.rollout.max_new_tokens))
        metrics.update(family_accuracy([(g.sample.family, [s.accuracy for s in g.scores]) for g in groups]))
        metrics.update(self.engine.take_counts())  # continued (interrupted) requests, servers lost
        metrics["data/epoch"] = self.sampler.epoch
        return Experience(trajectories, [g.sample.id for g in groups], metrics)


def broadcast_experience(experience: Optional[Experience]) -> Experience:
    """Rank 0's experience on every trainer rank (collective), as tensors where it is large:

    - a small header, pickled once: the metrics, sample ids and, per group of responses, its
      prompt text and image sizes; per response its group, length, finish reason and version;
    - the response token ids, the engine's log-probs, each token's policy version and the
      scalars (advantage, reward, accuracy, format, rectified) as flat tensors, to every rank
      (every rank lays out the same token rows);
    - each group's images once, as uint8 pixel tensors, only to the ranks of the first
      pipeline stage, which run the vision tower; later stages get blank images of the same
      size (the token layout and MRoPE positions depend on the size only).
    """
    if dist.get_world_size() == 1:
        return experience
    holder = [_header(experience) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    header = holder[0]
    lengths = [row[1] for row in header["rows"]]
    total, n = sum(lengths), len(lengths)
    mine = dist.get_rank() == 0
    ts = experience.trajectories if mine else None
    token_ids = _broadcast(torch.tensor([i for t in ts for i in t.response_ids], dtype=torch.int64) if mine
                           else torch.empty(total, dtype=torch.int64))
    logprobs = _broadcast(torch.tensor([x for t in ts for x in t.rollout_logprobs], dtype=torch.float64) if mine
                          else torch.empty(total, dtype=torch.float64))
    versions = _broadcast(torch.tensor([v for t in ts for v in t.versions()], dtype=torch.int64) if mine
                          else torch.empty(total, dtype=torch.int64))
    scalars = _broadcast(torch.tensor([[t.advantage, t.reward, t.accuracy, t.format, float(t.rectified)] for t in ts],
                                      dtype=torch.float64).reshape(n, 5) if mine
                         else torch.empty((n, 5), dtype=torch.float64))
    routed = _broadcast_routing(header["routing"], ts, n)
    images = _group_images(header["groups"], experience)
    if mine:
        return experience
    token_ids, logprobs, versions = token_ids.split(lengths), logprobs.split(lengths), versions.split(lengths)
    trajectories = []
    for k, (group, _, sample_id, finish_reason, version) in enumerate(header["rows"]):
        advantage, reward, accuracy, fmt, rectified = scalars[k].tolist()
        trajectories.append(Trajectory(sample_id, group, header["groups"][group][0], images[group],
                                       token_ids[k].tolist(), logprobs[k].tolist(), reward, accuracy, fmt,
                                       advantage, bool(rectified), finish_reason, version, versions[k].tolist(),
                                       routed[k]))
    return Experience(trajectories, header["sample_ids"], header["metrics"])


def _first_of_groups(experience: Experience) -> dict[int, Trajectory]:
    """Each group's first response: a group's responses share their prompt and images."""
    first: dict[int, Trajectory] = {}
    for t in experience.trajectories:
        first.setdefault(t.group, t)
    return first


def _header(experience: Experience) -> dict:
    groups = {g: (t.prompt, [(image.mode, image.size) for image in t.images])
              for g, t in _first_of_groups(experience).items()}
    rows = [(t.group, len(t.response_ids), t.sample_id, t.finish_reason, t.weight_version)
            for t in experience.trajectories]
    routed = [t.routed_experts for t in experience.trajectories]
    sample = next((r for r in routed if r is not None), None)
    routing = None if sample is None else {  # per response its routed tokens (-1: none), and [layers, k]
        "tokens": [-1 if r is None else r.shape[0] for r in routed], "shape": tuple(sample.shape[1:])}
    return {"metrics": experience.metrics, "sample_ids": experience.sample_ids, "groups": groups, "rows": rows,
            "routing": routing}


def _broadcast_routing(routing: Optional[dict], trajectories: Optional[list[Trajectory]], n: int) -> list:
    """Each of the ``n`` responses' engine routing (MoE routing replay) on every rank: one
    int32 tensor (gloo has no int16; rank 0 passes its ``trajectories``)."""
    if routing is None:
        return [None] * n
    counts = [max(c, 0) for c in routing["tokens"]]
    if trajectories is not None:
        flat = torch.cat([t.routed_experts for t in trajectories if t.routed_experts is not None]).to(torch.int32)
    else:
        flat = torch.empty((sum(counts), *routing["shape"]), dtype=torch.int32)
    parts = _broadcast(flat.contiguous()).to(torch.int16).split(counts)
    return [None if c < 0 else part for c, part in zip(routing["tokens"], parts)]


def _broadcast(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """A CPU tensor from global rank 0 (gloo, also beside NCCL: the trainer's group has both)."""
    if tensor.numel():
        dist.broadcast(tensor, src=0, group=group)
    return tensor


CHANNELS = {"RGB": 3, "L": 1, "RGBA": 4}  # the image modes that travel as pixels


def _group_images(groups: dict, experience: Optional[Experience]) -> dict[int, list[Image.Image]]:
    """Each group's images: rank 0 sends its pixels to the first pipeline stage's ranks (one
    uint8 tensor; rank 0 passes its ``experience``), later stages make blanks of the same size."""
    shapes = [(g, mode, size) for g, (_, images) in sorted(groups.items()) for mode, size in images]
    out: dict[int, list[Image.Image]] = {g: [] for g in groups}
    if not ps.is_pipeline_first_stage():
        for g, mode, size in shapes:
            out[g].append(Image.new(mode, size))
        return out
    sizes = [width * height * CHANNELS[mode] for _, mode, (width, height) in shapes]
    flat = torch.empty(sum(sizes), dtype=torch.uint8)
    if experience is not None and sizes:
        first = _first_of_groups(experience)
        flat = torch.cat([torch.from_numpy(np.array(image, dtype=np.uint8)).reshape(-1)
                          for g in sorted(groups) for image in first[g].images])
    _broadcast(flat, ps.get_tensor_and_data_parallel_group())
    for (g, mode, (width, height)), chunk in zip(shapes, flat.split(sizes)):
        array = chunk.numpy().reshape((height, width, CHANNELS[mode]))
        out[g].append(Image.fromarray(array[..., 0] if mode == "L" else array))
    return out


def rollout_metrics(trajectories: list[Trajectory], max_new_tokens: int) -> dict:
    """Reward, accuracy, format, lengths and advantage statistics of the on-policy responses
    (the rectified ones are counted separately by the IVR metrics)."""
    on = [t for t in trajectories if not t.rectified]
    if not on:
        return {"rollout/responses": 0}
    lengths = torch.tensor([len(t.response_ids) for t in on], dtype=torch.float32)
    adv = torch.tensor([t.advantage for t in trajectories])
    return {
        "rollout/responses": len(on), "rollout/rectified": len(trajectories) - len(on),
        "reward/mean": sum(t.reward for t in on) / len(on),
        "reward/accuracy": sum(t.accuracy for t in on) / len(on),
        "reward/format": sum(t.format for t in on) / len(on),
        "response/length_mean": lengths.mean().item(), "response/length_max": lengths.max().item(),
        "response/clipped_share": sum(t.finish_reason == "length" for t in on) / len(on),
        "advantage/mean": adv.mean().item(), "advantage/std": adv.std().item() if adv.numel() > 1 else 0.0,
        "advantage/abs_max": adv.abs().max().item(), "advantage/zero_share": (adv == 0).float().mean().item(),
        "rollout/weight_version_min": min(t.weight_version for t in on),
        "rollout/weight_version_max": max(t.weight_version for t in on),
    }


def family_accuracy(groups: list[tuple[Optional[str], list[float]]]) -> dict:
    """``reward/accuracy/<family>``: the on-policy accuracy of this step's responses per question
    family (samples without one are left out), the training curve of each family in a mixed pool."""
    by_family: dict[str, list[float]] = {}
    for family, accuracies in groups:
        if family and accuracies:
            by_family.setdefault(family, []).extend(accuracies)
    return {f"reward/accuracy/{family}": sum(values) / len(values) for family, values in sorted(by_family.items())}


def staleness_metrics(experience: Experience, step: int) -> dict:
    """How many versions behind the policy that trains step ``step`` (version ``step - 1``) the
    on-policy responses are, counted from each response's oldest token: 0 in sync mode, 1 in
    one_step_off after the first step, up to ``rollout.max_staleness`` in async. Also a
    histogram (``rollout/staleness_count_<lag>``: responses per lag) and each group's oldest
    version (``rollout/group_versions``, beside the step's ``samples``)."""
    on = [t for t in experience.trajectories if not t.rectified]
    if not on:
        return {}
    lags = [step - 1 - min(t.versions(), default=t.weight_version) for t in on]
    out = {"rollout/staleness_min": min(lags), "rollout/staleness_mean": sum(lags) / len(lags),
           "rollout/staleness_max": max(lags),
           "rollout/group_versions": [min((min(t.versions(), default=t.weight_version) for t in on if t.group == g),
                                          default=None) for g in range(len(experience.sample_ids))]}
    for lag in sorted(set(lags)):
        out[f"rollout/staleness_count_{lag}"] = lags.count(lag)
    out["rollout/partial_responses"] = sum(len(set(t.versions())) > 1 for t in on)
    return out

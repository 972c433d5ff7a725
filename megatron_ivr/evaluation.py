"""Greedy evaluation of a Hugging Face policy on a dataset split (spec section 5: temperature 0,
the same grader as the training reward).

Writes one record per sample (``eval_{split}_samples.jsonl``) and the summary (overall and
per question family) to the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch

from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data import ImageRules, read_dataset
from megatron_ivr.metrics import MetricsWriter
from megatron_ivr.models.processor import MERGE_SIZE, PATCH_SIZE, load_processor, model_family
from megatron_ivr.models.tiny import load_model
from megatron_ivr.prompts import render_prompt
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.local import LocalEngine

logger = logging.getLogger(__name__)


def split_path(cfg: RunConfig, split: str) -> str:
    path = {"train": cfg.data.train_path, "val": cfg.data.val_path, "test": cfg.data.test_path}[split]
    if path is None:
        raise ValueError(f"eval.split={split!r} but data.{split}_path is not set")
    return path


@torch.no_grad()
def evaluate(cfg: RunConfig, progress=print) -> dict:
    torch.set_num_threads(cfg.trainer.num_threads)
    family = model_family(cfg.model.path)
    rules = ImageRules(PATCH_SIZE[family] * MERGE_SIZE, cfg.data.min_pixels, cfg.data.max_pixels)
    dataset = read_dataset(split_path(cfg, cfg.eval.split), rules, cfg.data.max_bad_fraction,
                           cfg.data.image_root, limit=cfg.eval.max_samples,
                           allow_outside_root=cfg.data.allow_outside_root)
    engine = LocalEngine(load_model(cfg.model.path), load_processor(cfg.model.path), cfg.eval.batch_size)
    greedy = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    samples = dataset.samples
    log_dir = Path(cfg.logging.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    records = []
    start = time.time()
    with RewardFunction(cfg.reward) as reward_fn:
        for begin in range(0, len(samples), cfg.eval.batch_size):
            batch = samples[begin:begin + cfg.eval.batch_size]
            requests = [GenerationRequest(render_prompt("response", cfg.reward.template, question=s.question),
                                          s.images, s.id) for s in batch]
            completions = [group[0].text for group in engine.generate(requests, greedy)]
            rewards = reward_fn(completions, [s.answer for s in batch])
            for sample, completion, reward in zip(batch, completions, rewards):
                records.append({"id": sample.id, "family": sample.family, "answer": sample.answer,
                                "response": completion, "reward": reward.total, "format": reward.format,
                                "accuracy": reward.accuracy})
            progress(f"eval {cfg.eval.split}: {len(records)}/{len(samples)} samples, "
                     f"{time.time() - start:.1f}s")
    with open(log_dir / f"eval_{cfg.eval.split}_samples.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    summary = summarize(records, prefix=f"eval/{cfg.eval.split}")
    summary.update(dataset.metrics(prefix=f"eval/{cfg.eval.split}/data"))
    summary[f"eval/{cfg.eval.split}/seconds"] = time.time() - start
    with MetricsWriter(log_dir, cfg.logging.tensorboard) as writer:
        writer.log(summary)
    return summary


def summarize(records: list[dict], prefix: str) -> dict:
    """Mean reward, accuracy and format rate, overall and per question family."""
    groups = defaultdict(list)
    for record in records:
        groups["all"].append(record)
        if record.get("family"):
            groups[record["family"]].append(record)
    summary = {}
    for name, rows in sorted(groups.items()):
        key = prefix if name == "all" else f"{prefix}/{name}"
        for metric in ("reward", "accuracy", "format"):
            summary[f"{key}/{metric}"] = sum(r[metric] for r in rows) / len(rows)
        summary[f"{key}/count"] = len(rows)
    return summary

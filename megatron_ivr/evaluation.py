"""Greedy evaluation (spec section 5: temperature 0, the same grader as the training reward).

``megatron-ivr eval`` evaluates ``model.path`` (a Hugging Face folder, or a Megatron
checkpoint of this system: a trainer ``step_N`` folder or a converter checkpoint, converted
to HF on the fly) on either

- a split of the configured dataset (``eval.split``: train | val | test), or
- public benchmarks in their own file layouts (``eval.benchmarks``: name -> file or folder,
  read by :mod:`megatron_ivr.data.benchmarks`), several in one command.

Generation goes through the engine interface: the in-process engine, or SGLang servers
(``rollout.backend=sglang`` with ``rollout.server_urls``) for throughput. For each suite it
writes one record per sample (``eval_{name}_samples.jsonl``), the summary (overall and per
subset / question family) to ``metrics.jsonl``, and all suites as one markdown table
(``eval_summary.md``), all under ``logging.dir``.

Greedy accuracy is the headline. Beside it (``megatron_ivr/rewards/statistics.py``): the
majority-answer share, the accuracy macro-averaged over gold answers and, for a split of the
configured dataset, the blind guesser of the training answers; with ``eval.samples = k``, the
sampled panel (mean@k, maj@k, pass@k at ``eval.temperature``, and the blind guesser's pass@k);
with ``eval.blank_images``, every suite again with empty images (``<name>_blank``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megatron_ivr.config.schema import RunConfig
from megatron_ivr.data import ImageRules, read_dataset
from megatron_ivr.data.benchmarks import read_benchmark
from megatron_ivr.data.images import blank_like
from megatron_ivr.data.readers import answer_pairs
from megatron_ivr.metrics import MetricsWriter
from megatron_ivr.model_providers.convert import META_NAME, megatron_to_hf
from megatron_ivr.models.processor import MERGE_SIZE, PATCH_SIZE, check_model_family, load_processor, model_family
from megatron_ivr.prompts import render_prompt
from megatron_ivr.rewards import RewardFunction
from megatron_ivr.rewards.statistics import AnswerPrior, answer_prior, answer_statistics, extracted_answer
from megatron_ivr.rollout import GenerationRequest, SamplingParams
from megatron_ivr.rollout.factory import make_engine

logger = logging.getLogger(__name__)


def split_path(cfg: RunConfig, split: str) -> str:
    path = {"train": cfg.data.train_path, "val": cfg.data.val_path, "test": cfg.data.test_path}[split]
    if path is None:
        raise ValueError(f"eval.split={split!r} but data.{split}_path is not set")
    return path


def resolve_policy(model_path: str, work_dir: Path) -> str:
    """An HF folder for ``model_path``: itself, or a Megatron checkpoint converted once into
    ``work_dir/policy_hf`` (exact: the converters round-trip bit for bit)."""
    path = Path(model_path)
    source = next((p for p in (path, path / "dist") if (p / META_NAME).exists()), None)
    if source is None:
        return model_path
    out = work_dir / "policy_hf"
    marker = out / "converted_from.txt"
    if not (marker.exists() and marker.read_text() == str(source.resolve())):
        megatron_to_hf(source, out, overwrite=True)  # this evaluation's own folder
        marker.write_text(str(source.resolve()))
    return str(out)


def grading_tolerance(sample) -> float:
    """Relative tolerance for the grader: 1e-4, or half a unit of the benchmark's stated
    precision (MathVista grades ``1.454`` right against ``1.45`` at precision 2)."""
    precision = sample.meta.get("precision")
    if precision is None:
        return 1e-4
    try:
        gold = abs(float(sample.answer))
    except ValueError:
        return 1e-4
    return 0.5 * 10.0 ** -precision / max(1.0, gold)


def evaluate_samples(engine, reward_fn, samples, cfg: RunConfig, label: str, progress=print) -> list[dict]:
    """One record per sample: the greedy response and its grades; with ``eval.samples = k``,
    also the k sampled responses with their extracted answers and accuracies (``samples``: what
    rejection-sampling fine-tuning keeps, :mod:`megatron_ivr.data.rejection_sampling`)."""
    greedy = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    k = cfg.eval.samples
    records, start = [], time.time()
    for begin in range(0, len(samples), cfg.eval.batch_size):
        batch = samples[begin:begin + cfg.eval.batch_size]
        requests = [GenerationRequest(render_prompt("response", cfg.reward.template, question=s.question),
                                      s.images, s.id) for s in batch]
        completions = [group[0].text for group in engine.generate(requests, greedy)]
        rewards = reward_fn(completions, [s.answer for s in batch], [grading_tolerance(s) for s in batch])
        sampled = [[] for _ in batch]
        if k:
            sampling = SamplingParams(max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.temperature,
                                      n=k, seed=cfg.trainer.seed + begin)
            texts = [[c.text for c in group] for group in engine.generate(requests, sampling)]
            grades = reward_fn([t for group in texts for t in group], [s.answer for s in batch for _ in range(k)],
                               [grading_tolerance(s) for s in batch for _ in range(k)])
            for i, group in enumerate(texts):
                sampled[i] = [{"answer": extracted_answer(text), "accuracy": grade.accuracy, "text": text}
                              for text, grade in zip(group, grades[i * k:(i + 1) * k])]
        for sample, completion, reward, drawn in zip(batch, completions, rewards, sampled):
            records.append({"id": sample.id, "family": sample.family, "answer": sample.answer,
                            "response": completion, "reward": reward.total, "format": reward.format,
                            "accuracy": reward.accuracy, **({"samples": drawn} if k else {})})
        filled = 24 * len(records) // max(1, len(samples))
        progress(f"eval {label}: [{'#' * filled}{'.' * (24 - filled)}] {len(records)}/{len(samples)} samples, "
                 f"{time.time() - start:.1f}s")
    return records


def _suites(cfg: RunConfig, rules: ImageRules):
    """(name, loaded dataset, its samples) per suite: the benchmarks when given, else the split;
    each followed by its image-blanked copy when ``eval.blank_images``."""
    if not cfg.eval.benchmarks:
        loaded = [(cfg.eval.split, read_dataset(split_path(cfg, cfg.eval.split), rules, cfg.data.max_bad_fraction,
                                                cfg.data.image_root, limit=cfg.eval.max_samples,
                                                allow_outside_root=cfg.data.allow_outside_root))]
    else:
        loaded = ((name, read_benchmark(name, path, rules, limit=cfg.eval.max_samples,
                                        max_bad_fraction=cfg.data.max_bad_fraction))
                  for name, path in cfg.eval.benchmarks.items())
    for name, dataset in loaded:
        yield name, dataset, dataset.samples
        if cfg.eval.blank_images:
            yield f"{name}_blank", dataset, [replace(s, images=[blank_like(i) for i in s.images])
                                             for s in dataset.samples]


def training_prior(cfg: RunConfig) -> Optional[AnswerPrior]:
    """The blind guesser's answer distribution per family: every answer the policy trained on,
    RL's prompts (``data.train_path``) and SFT's rows (``sft.data_paths``), those that are files,
    when a split of the configured dataset is evaluated (None otherwise, or when none is a file:
    a benchmark has its own answers)."""
    paths = [p for p in [cfg.data.train_path, *cfg.sft.data_paths] if p and Path(p).is_file()]
    if cfg.eval.benchmarks or not paths:
        return None
    return answer_prior(pair for path in dict.fromkeys(paths) for pair in answer_pairs(path))


@torch.no_grad()
def evaluate(cfg: RunConfig, progress=print) -> dict:
    """Evaluate every suite; returns the summaries of all of them in one dict."""
    torch.set_num_threads(cfg.trainer.num_threads)
    log_dir = Path(cfg.logging.dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    model_path = resolve_policy(cfg.model.path, log_dir)
    check_model_family(cfg.model.family, model_path)
    family = model_family(model_path)
    rules = ImageRules(PATCH_SIZE[family] * MERGE_SIZE, cfg.data.min_pixels, cfg.data.max_pixels,
                       cfg.data.max_source_pixels)
    processor = load_processor(model_path)
    engine = make_engine(cfg.rollout, model_path, processor, cfg.eval.batch_size)
    prior = training_prior(cfg)
    summary: dict = {}
    tables = []
    with RewardFunction(cfg.reward) as reward_fn:
        for name, dataset, samples in _suites(cfg, rules):
            start = time.time()
            records = evaluate_samples(engine, reward_fn, samples, cfg, name, progress)
            with open(log_dir / f"eval_{name}_samples.jsonl", "w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(json.dumps(record) + "\n")
            part = summarize(records, prefix=f"eval/{name}", prior=prior)
            part.update(dataset.metrics(prefix=f"eval/{name}/data"))
            part[f"eval/{name}/seconds"] = time.time() - start
            summary.update(part)
            tables.append(markdown_table(name, part))
    panel = (f"; sampled panel: {cfg.eval.samples} responses per question at temperature {cfg.eval.temperature}"
             if cfg.eval.samples else "")
    (log_dir / "eval_summary.md").write_text(
        f"# Greedy evaluation of {cfg.model.path}\n\nGreedy accuracy is the headline{panel}. Beside it: the "
        "share of the most common gold answer (a constant answer scores it), accuracy macro-averaged over gold "
        "answers, and a blind guesser sampling each family's training answers without the image (expected "
        "values).\n\n" + "\n".join(tables), encoding="utf-8")
    with MetricsWriter(log_dir, cfg.logging.tensorboard) as writer:
        writer.log(summary)
    return summary


def summarize(records: list[dict], prefix: str, prior: Optional[AnswerPrior] = None) -> dict:
    """Mean reward, accuracy and format rate, overall and per question family / subset, each
    with its answer statistics (``rewards/statistics.py``: majority share, macro accuracy over
    gold answers, the blind guesser from ``prior``, the sampled panel when sampled)."""
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
        summary.update({f"{key}/{name}": value for name, value in answer_statistics(rows, prior).items()})
    return summary


# the table's columns after n: (metric suffix, header), shown when the summary has them
COLUMNS = (("accuracy", "accuracy"), ("accuracy_macro", "macro over gold"), ("majority_share", "majority share"),
           ("blind_accuracy", "blind"), ("format", "format"))


def markdown_table(name: str, summary: dict) -> str:
    """One suite: overall, then each subset, with counts; bad rows skipped are stated."""
    prefix = f"eval/{name}"
    panel = ("mean", "maj", "pass", "blind_pass")  # the sampled panel, in this order
    sampled = sorted({k.rsplit("/", 1)[1] for k in summary if k.startswith(prefix + "/")
                      and k.rsplit("/", 1)[1].split("@")[0] in panel}, key=lambda c: panel.index(c.split("@")[0]))
    columns = [(key, header) for key, header in COLUMNS if f"{prefix}/{key}" in summary]
    columns += [(key, key.replace("blind_pass", "blind pass")) for key in sampled]
    lines = [f"## {name}", "", "| subset | n | " + " | ".join(h for _, h in columns) + " |",
             "| --- | --- | " + " | ".join("---" for _ in columns) + " |"]
    subsets = sorted(k[len(prefix) + 1:-len("/accuracy")] for k in summary
                     if k.startswith(prefix + "/") and k.endswith("/accuracy") and k != prefix + "/accuracy")
    for subset, key in [("all", prefix)] + [(subset, f"{prefix}/{subset}") for subset in subsets]:
        cells = " | ".join(f"{summary[f'{key}/{c}']:.3f}" if f"{key}/{c}" in summary else "-" for c, _ in columns)
        lines.append(f"| {subset} | {summary[key + '/count']} | {cells} |")
    bad = summary.get(f"{prefix}/data/bad_samples", 0)
    if bad:
        lines.append(f"\n{bad} unreadable row(s) skipped (ids in the log).")
    return "\n".join(lines) + "\n"

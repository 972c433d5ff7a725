"""Greedy evaluation end to end on the tiny model: metrics consistent with the per-sample file."""

from __future__ import annotations

import json

import pytest

from megatron_ivr.config import load_config
from megatron_ivr.evaluation import evaluate, summarize
from megatron_ivr.metrics import read_metrics


def test_summarize_by_family():
    records = [{"family": "count", "reward": 1.0, "accuracy": 1.0, "format": 1.0},
               {"family": "count", "reward": 0.0, "accuracy": 0.0, "format": 0.0},
               {"family": "compare", "reward": 0.9, "accuracy": 1.0, "format": 0.0}]
    summary = summarize(records, "eval/test")
    assert summary["eval/test/accuracy"] == pytest.approx(2 / 3)
    assert summary["eval/test/count/accuracy"] == 0.5 and summary["eval/test/compare/count"] == 1


def test_evaluate_tiny_model(tiny_models, synthetic_dir, tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", [
        f"model.path={tiny_models['qwen3_vl']}", "model.family=qwen3_vl",
        f"data.test_path={synthetic_dir / 'test.jsonl'}", f"logging.dir={tmp_path}",
        "eval.max_samples=8", "eval.batch_size=4", "eval.max_new_tokens=8",
    ])
    lines = []
    summary = evaluate(cfg, progress=lines.append)
    records = [json.loads(x) for x in (tmp_path / "eval_test_samples.jsonl").read_text().splitlines()]
    assert len(records) == 8 and len(lines) == 2
    assert summary["eval/test/count"] == 8
    assert summary["eval/test/reward"] == pytest.approx(sum(r["reward"] for r in records) / 8)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["eval/test/count"] == 8

"""``megatron-ivr report`` (megatron_ivr/report.py): a pipeline folder's curves and summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_ivr.report import compare_runs, evaluation_table, expand, load_steps, trailing_mean, write_report


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_trailing_mean():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert trailing_mean([2.0, 4.0], 5) == [2.0, 3.0]


def test_report_of_a_demo_folder(tmp_path):
    """SFT and RL curves (the RL run resumed: its step 3 logged twice, the last one counts),
    the evaluations of both policies side by side, and the CLI entry point."""
    sft = [{"step": s, "sft/loss": 2.0 / s, "sft/grad_norm": 1.0, "time/step": 0.5} for s in range(1, 31)]
    rl = [{"step": s, "reward/mean": 0.1 * s, "reward/accuracy": 0.05 * s, "loss/total": 0.01,
           "vicra/vg_share": 0.2, "ivr/eroded_share": 0.4, "time/step": 2.0} for s in range(1, 6)]
    rl.insert(2, {"step": 3, "reward/mean": -9.0, "time/step": 2.0})  # before the crash
    _write(tmp_path / "sft" / "logs" / "metrics.jsonl", sft)
    _write(tmp_path / "rl" / "logs" / "metrics.jsonl", rl)
    for name, accuracy in (("sft", 0.5), ("rl", 0.625)):
        _write(tmp_path / "eval" / name / "metrics.jsonl",
               [{"eval/test/accuracy": accuracy, "eval/test/count": 256.0, "eval/test/count/accuracy": 1.0}])
    steps, _ = load_steps(tmp_path / "rl" / "logs" / "metrics.jsonl")
    assert steps[3]["reward/mean"] == pytest.approx(0.3)  # the last record of step 3
    report = write_report(tmp_path)
    text = report.read_text()
    assert "| test (n=256) | 0.500 | 0.625 |" in text
    assert "| reward/mean | 0.1 | 0.5 |" in text  # first and last step of five
    assert "Training time (sum of step times): 15 s." in text  # 30 SFT steps x 0.5 s
    for name in ("curves_sft.png", "curves_rl.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "report", str(tmp_path), "--out",
                             str(tmp_path / "again")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "again" / "report.md").read_text() == text.replace(str(tmp_path / "report"),
                                                                        str(tmp_path / "again"))


def test_family_curves_and_macro_table():
    """A ``prefix/*`` panel series stands for every key under it (the per-family training
    accuracy); the macro-over-answers table sits beside the accuracy one."""
    steps = {1: {"reward/accuracy/union": 0.2, "reward/accuracy/compare": 0.5}, 2: {"reward/accuracy/union": 0.3}}
    assert expand([("reward/accuracy/*", ""), ("reward/mean", "reward")], steps) == [
        ("reward/accuracy/compare", "compare"), ("reward/accuracy/union", "union"), ("reward/mean", "reward")]
    evaluations = {"sft": {"eval/test/union/accuracy_macro": 0.25, "eval/test/union/accuracy": 0.3,
                           "eval/test/union/count": 256},
                   "rl": {"eval/test/union/accuracy_macro": 0.4, "eval/test/union/accuracy": 0.41}}
    macro = evaluation_table(evaluations, "accuracy_macro")
    assert macro[0] == "## Greedy evaluation (accuracy macro-averaged over gold answers)"
    assert "| test/union (n=256) | 0.250 | 0.400 |" in macro
    assert "| test/union (n=256) | 0.300 | 0.410 |" in evaluation_table(evaluations)
    assert evaluation_table({"sft": {"eval/test/accuracy": 0.5}}, "accuracy_macro") == []


def test_report_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_compare_runs(tmp_path):
    """Several runs' curves of one metric side by side; the table holds each run's first- and
    last-quarter means; a pipeline folder contributes its RL stage; the CLI takes LABEL=DIR."""
    _write(tmp_path / "a" / "logs" / "metrics.jsonl",
           [{"step": s, "reward/accuracy/union": 0.1 * s} for s in range(1, 9)])  # quarters: 0.15 and 0.75
    _write(tmp_path / "demo" / "rl" / "logs" / "metrics.jsonl",
           [{"step": s, "reward/accuracy/union": 0.5, "reward/mean": 1.0} for s in range(1, 5)])
    _write(tmp_path / "demo" / "sft" / "logs" / "metrics.jsonl", [{"step": 1, "sft/loss": 1.0}])
    table = compare_runs({"a": tmp_path / "a", "b": tmp_path / "demo"}, ["reward/accuracy/union", "reward/mean"],
                         tmp_path / "out").read_text()
    assert "| a | 0.150 -> 0.750 | - |" in table
    assert "| b | 0.500 -> 0.500 | 1.000 -> 1.000 |" in table
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        compare_runs({"x": tmp_path / "nothing"}, ["reward/mean"], tmp_path / "out")
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "report", f"first={tmp_path / 'a'}",
                             str(tmp_path / "demo"), "--metric", "reward/accuracy/union", "--out",
                             str(tmp_path / "cli")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = (tmp_path / "cli" / "compare.md").read_text()
    assert "| first | 0.150 -> 0.750 |" in text and "| demo | 0.500 -> 0.500 |" in text

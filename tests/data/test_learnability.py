"""Learnability-weighted prompt pools: weights p(1-p) from sampled pass rates."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from megatron_ivr.data.learnability import learnability, learnability_pool, pass_rates, write_learnability_pool

PROMPTS = {pid: {"id": pid, "images": [f"images/{pid}.png"], "question": "How many?", "answer": "2", "family": fam}
           for pid, fam in [("half", "union"), ("quarter", "union"), ("never", "union"), ("always", "count")]}
HITS = {"half": 4, "quarter": 2, "never": 0, "always": 8}  # accepted of 8 samples


def _records():
    return [{"id": pid, "samples": [{"text": f"r{k}", "accuracy": 1.0 if k < hits else 0.0, "answer": None}
                                    for k in range(8)]} for pid, hits in HITS.items()]


def test_pass_rates_and_weights():
    assert pass_rates(_records()) == {"half": 0.5, "quarter": 0.25, "never": 0.0, "always": 1.0}
    assert learnability(0.5) == 0.25 and learnability(0.25) == 0.1875
    assert learnability(0.0) == learnability(1.0) == 0.0


def test_pool_draws_in_proportion_to_p_one_minus_p():
    rows = learnability_pool(pass_rates(_records()), PROMPTS, size=20_000, seed=3)
    drawn = Counter(row["id"].rsplit("~", 1)[0] for row in rows)
    assert set(drawn) == {"half", "quarter"}  # never and always solved: weight 0
    # expected share of "half": 0.25 / (0.25 + 0.1875) = 0.5714; binomial std at n = 20,000 is 0.0035
    assert drawn["half"] / len(rows) == pytest.approx(0.25 / 0.4375, abs=0.015)
    assert len({row["id"] for row in rows}) == len(rows)  # every copy has an id of its own
    first = next(row for row in rows if row["id"].startswith("half~"))
    assert first["pass_rate"] == 0.5 and first["images"] == ["images/half.png"] and first["family"] == "union"
    assert rows == learnability_pool(pass_rates(_records()), PROMPTS, size=20_000, seed=3)
    assert rows != learnability_pool(pass_rates(_records()), PROMPTS, size=20_000, seed=4)


def test_refuses_what_it_cannot_weight():
    unlearnable = [r for r in _records() if r["id"] in ("never", "always")]
    with pytest.raises(ValueError, match="no prompt of 2 is learnable"):
        learnability_pool(pass_rates(unlearnable), PROMPTS, size=4, seed=0)
    with pytest.raises(KeyError, match="not in the prompt file"):
        learnability_pool({"q9": 0.5}, PROMPTS, size=4, seed=0)
    with pytest.raises(ValueError, match="eval.samples > 0"):
        pass_rates([{"id": "half"}])
    with pytest.raises(ValueError, match="size must be >= 1"):
        learnability_pool(pass_rates(_records()), PROMPTS, size=0, seed=0)


def test_write_pool_reports_what_was_dropped(tmp_path):
    samples, prompts, out = tmp_path / "samples.jsonl", tmp_path / "rl.jsonl", tmp_path / "pool.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS.values()))
    counts = write_learnability_pool(samples, prompts, out, size=64, seed=0)
    assert (counts["prompts"], counts["never_solved"], counts["always_solved"], counts["rows"], counts["distinct"]) \
        == (4, 1, 1, 64, 2)
    assert counts["families"]["union"]["pass_rate"] == 0.25 and counts["families"]["union"]["pool_share"] == 1.0
    assert counts["families"]["count"] == {"prompts": 1, "pass_rate": 1.0, "pool_share": 0.0}
    assert len(out.read_text().splitlines()) == 64 and not (tmp_path / "pool.jsonl.tmp").exists()
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "data", "learnability", str(samples),
                             str(prompts), "--out", str(tmp_path / "cli.jsonl"), "--size", "64", "--by-family"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "64 rows drawn from 2 distinct prompts of 4 evaluated (1 never solved, 1 always solved" in result.stdout
    assert "union: 3 prompts, pass rate 0.250, 100.0% of the pool" in result.stdout


def test_by_family_keeps_each_family_share():
    prompts = {**PROMPTS, "c_half": {**PROMPTS["always"], "id": "c_half"}}
    records = [*_records(), {"id": "c_half", "samples": [{"text": "r", "accuracy": float(k < 4)} for k in range(8)]}]
    rates = pass_rates(records)
    drawn = Counter(row["family"] for row in learnability_pool(rates, prompts, size=20_000, seed=1, by_family=True))
    # union holds 3 of the 5 prompts, count 2 (one of them never learnable): shares 0.6 / 0.4
    assert drawn["union"] / 20_000 == pytest.approx(0.6, abs=0.015)
    # the whole-pool weighting gives count only c_half's weight: 0.25 / (0.25 + 0.25 + 0.1875) = 0.364
    drawn = Counter(row["family"] for row in learnability_pool(rates, prompts, size=20_000, seed=1))
    assert drawn["count"] / 20_000 == pytest.approx(0.25 / 0.6875, abs=0.015)

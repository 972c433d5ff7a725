"""Rejection-sampling fine-tuning rows: accepted sampled responses, distinct per prompt."""

from __future__ import annotations

import json

import pytest

from megatron_ivr.data.rejection_sampling import accepted_rows, write_accepted

PROMPTS = {"q1": {"id": "q1", "images": ["images/a.png"], "question": "How many?", "answer": "2", "family": "union"},
           "q2": {"id": "q2", "images": ["images/b.png"], "question": "Which?", "answer": "A", "family": "compare"}}


def _record(sample_id, drawn):
    return {"id": sample_id, "answer": PROMPTS[sample_id]["answer"],
            "samples": [{"text": text, "accuracy": acc, "answer": None} for text, acc in drawn]}


def test_keeps_distinct_accepted_responses():
    records = [_record("q1", [("r1", 1.0), ("r2", 0.0), ("r1", 1.0), ("r3", 1.0)]), _record("q2", [("x", 0.0)])]
    rows = accepted_rows(records, PROMPTS)
    assert [(r["id"], r["reasoning"]) for r in rows] == [("q1/rft0", "r1"), ("q1/rft1", "r3")]
    assert rows[0]["images"] == ["images/a.png"] and rows[0]["answer"] == "2" and rows[0]["family"] == "union"
    assert len(accepted_rows(records, PROMPTS, max_per_prompt=1)) == 1


def test_refuses_records_it_cannot_use():
    with pytest.raises(ValueError, match="eval.samples > 0"):
        accepted_rows([{"id": "q1"}], PROMPTS)
    with pytest.raises(KeyError, match="not in the prompt file"):
        accepted_rows([{"id": "q9", "samples": []}], PROMPTS)
    with pytest.raises(ValueError, match="without their text"):
        accepted_rows([{"id": "q1", "samples": [{"accuracy": 1.0}]}], PROMPTS)


def test_write_accepted_counts(tmp_path):
    samples, prompts, out = tmp_path / "samples.jsonl", tmp_path / "prompts.jsonl", tmp_path / "rft.jsonl"
    samples.write_text(json.dumps(_record("q1", [("r1", 1.0), ("r2", 1.0)])) + "\n"
                       + json.dumps(_record("q2", [("x", 0.0), ("y", 0.0)])) + "\n")
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS.values()))
    counts = write_accepted(samples, prompts, out)
    assert counts == {"prompts": 2, "sampled": 4, "rows": 2, "prompts_kept": 1}
    assert [json.loads(line)["reasoning"] for line in out.read_text().splitlines()] == ["r1", "r2"]
    assert not (tmp_path / "rft.jsonl.tmp").exists()

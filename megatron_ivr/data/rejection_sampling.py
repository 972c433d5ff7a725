"""Rejection-sampling fine-tuning data (RFT; Yuan et al. 2023, "Scaling relationship on learning
mathematical reasoning"): the policy's own sampled responses that the grader accepts, as SFT rows.

The control that asks whether RL adds anything beyond "keep what was right and imitate it": one
round of it on RL's own prompts, from the policy RL starts from, is what ``megatron-ivr ablate``'s
``rft`` arm trains (the samples come from ``megatron-ivr eval`` with ``eval.samples = k``).
"""

from __future__ import annotations

from pathlib import Path

from megatron_ivr.data.jsonl import read_jsonl, write_jsonl


def sampled_responses(record: dict) -> list[dict]:
    """The sampled responses of one ``megatron-ivr eval`` record (``eval.samples = k``), each with
    its ``text`` and ``accuracy``; a record without them is an error that says how to get them."""
    if "samples" not in record:
        raise ValueError(f"eval record {record.get('id')!r} has no sampled responses: evaluate with "
                         "eval.samples > 0")
    for drawn in record["samples"]:
        if "text" not in drawn:
            raise ValueError(f"eval record {record['id']!r}: sampled responses without their text (an "
                             "evaluation from before the texts were kept); evaluate again")
    return record["samples"]


def accepted_rows(eval_records: list[dict], prompts: dict[str, dict], max_per_prompt: int | None = None) -> list[dict]:
    """One SFT row (``reasoning`` = the response) per distinct accepted sampled response.

    ``eval_records``: the per-sample records of ``megatron-ivr eval`` with sampled responses
    (``samples``: ``text`` and ``accuracy`` each); ``prompts``: the evaluated rows by id (their
    images, question, answer and family are carried over). Duplicates of one prompt's response
    are kept once; ``max_per_prompt`` caps the rows of one prompt (None: all).
    """
    rows = []
    for record in eval_records:
        drawn_responses = sampled_responses(record)
        source = prompts.get(record["id"])
        if source is None:
            raise KeyError(f"eval record {record['id']!r} is not in the prompt file")
        kept: list[str] = []
        for drawn in drawn_responses:
            if drawn["accuracy"] >= 1.0 and drawn["text"] not in kept:
                kept.append(drawn["text"])
        for k, text in enumerate(kept[:max_per_prompt]):
            rows.append({"id": f"{record['id']}/rft{k}", "images": source["images"], "question": source["question"],
                         "answer": source["answer"], "family": source.get("family"), "reasoning": text})
    return rows


def write_accepted(samples_path: str | Path, prompts_path: str | Path, out_path: str | Path,
                   max_per_prompt: int | None = None) -> dict:
    """Read ``eval_*_samples.jsonl`` and its prompt file; write the accepted rows to ``out_path``
    (atomically); return counts (prompts, sampled responses, rows, prompts with a row)."""
    records = read_jsonl(samples_path)
    prompts = {row["id"]: row for row in read_jsonl(prompts_path)}
    rows = accepted_rows(records, prompts, max_per_prompt)
    write_jsonl(out_path, rows)
    return {"prompts": len(records), "sampled": sum(len(r["samples"]) for r in records), "rows": len(rows),
            "prompts_kept": sum(any(d["accuracy"] >= 1.0 for d in r["samples"]) for r in records)}

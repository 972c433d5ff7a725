"""Statistics of graded answers, and the baselines a skeptic puts beside a policy's accuracy.

The answers of a dataset are often few and skewed (the demo's ``count_attr`` is "1" for half of
its questions): an accuracy means little until it is read against

- the **majority share**: the share of the most common gold answer, which a constant answer
  scores;
- the accuracy **macro-averaged over gold answers**: the mean, over the distinct gold answers,
  of the accuracy on the questions with that answer; a policy that answers by the prior
  scores the majority share in raw accuracy but 1 / (number of answers) here;
- the **blind guesser**: it samples the family's answer distribution of the *training* data
  and never looks at the image. Its expected accuracy is ``mean_q p_train(gold_q)`` and its
  pass@k ``mean_q 1 - (1 - p_train(gold_q))^k``, exactly (no sampling);
- for k sampled responses per question (the secondary panel, at a stated temperature):
  **mean@k** (the mean accuracy), **maj@k** (the accuracy of the most frequent extracted
  answer; responses without one do not vote) and **pass@k** (any correct).

A record is one question: ``{"family", "answer" (gold), "accuracy" (greedy), and optionally
"samples": [{"answer": extracted or None, "accuracy"}, ...]}``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Optional

from megatron_ivr.rewards.extract import last_boxed

AnswerPrior = dict[Optional[str], dict[str, float]]  # family -> gold answer -> probability


def normalized(answer: Optional[str]) -> Optional[str]:
    """An answer compared as text: stripped, inner whitespace collapsed (None stays None)."""
    return None if answer is None else " ".join(str(answer).split())


def extracted_answer(response: str) -> Optional[str]:
    """The answer a response gives (its last ``\\boxed{}``), normalized; None without one."""
    return normalized(last_boxed(response))


def answer_prior(pairs: Iterable[tuple[Optional[str], str]]) -> AnswerPrior:
    """Per family, the distribution of its gold answers, from ``(family, answer)`` pairs."""
    counts: dict[Optional[str], Counter] = defaultdict(Counter)
    for family, answer in pairs:
        counts[family][normalized(answer)] += 1
    return {family: {a: n / sum(c.values()) for a, n in c.items()} for family, c in counts.items()}


def majority_vote(samples: list[dict]) -> float:
    """maj@k of one question: the accuracy of the most frequent extracted answer (the first one
    to reach that count among ties); 0 when no response has an answer."""
    votes = Counter(s["answer"] for s in samples if s["answer"] is not None)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(s["answer"] for s in samples if s["answer"] is not None and votes[s["answer"]] == top)
    return next(s["accuracy"] for s in samples if s["answer"] == winner)


def answer_statistics(records: list[dict], prior: Optional[AnswerPrior] = None) -> dict[str, float]:
    """The statistics above for one group of questions (one family, or all). With ``prior``
    (:func:`answer_prior` of the training data) the blind guesser's numbers, each question
    guessed from its own family's distribution; with samples, the sampled panel."""
    n = len(records)
    golds = [normalized(r["answer"]) for r in records]
    by_gold: dict[str, list[float]] = defaultdict(list)
    for gold, record in zip(golds, records):
        by_gold[gold].append(record["accuracy"])
    out = {"majority_share": max(Counter(golds).values()) / n,
           "accuracy_macro": sum(sum(v) / len(v) for v in by_gold.values()) / len(by_gold)}
    k = min((len(r.get("samples") or []) for r in records), default=0)
    if prior is not None:
        hit = [prior.get(r.get("family"), {}).get(gold, 0.0) for r, gold in zip(records, golds)]
        out["blind_accuracy"] = sum(hit) / n
        if k:
            out[f"blind_pass@{k}"] = sum(1.0 - (1.0 - p) ** k for p in hit) / n
    if k:
        samples = [r["samples"][:k] for r in records]
        out[f"mean@{k}"] = sum(s["accuracy"] for group in samples for s in group) / (n * k)
        out[f"maj@{k}"] = sum(majority_vote(group) for group in samples) / n
        out[f"pass@{k}"] = sum(float(any(s["accuracy"] > 0 for s in group)) for group in samples) / n
    return out

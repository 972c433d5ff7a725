"""Learnability-weighted prompt pools: draw RL prompts in proportion to ``p (1 - p)``, where
``p`` is the policy's pass rate on the prompt (Foster and Foerster 2025, "Learning to reason at
the frontier of learnability"; Tzannetos et al. 2023 for the ``p (1 - p)`` score).

A GRPO group whose responses are all right or all wrong has zero advantage everywhere and
teaches nothing; ``p (1 - p)`` is the variance of the 0/1 reward, so it is largest where the
policy succeeds half the time and zero where it always or never does. ``p`` is estimated
before RL from ``megatron-ivr eval`` with ``eval.split = train`` and ``eval.samples = k`` (k
samples per prompt at the rollout temperature, from the policy RL starts from); the pool
written here holds ``size`` prompts drawn with replacement with those weights, each copy with
an id of its own, and RL trains on it as on any pool.

Weighting the whole pool moves it towards the families the policy half-solves. With
``by_family`` the weights apply within each family instead, and each family keeps its share of
the evaluated prompts (a family with no learnable prompt gives its share to the others).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from megatron_ivr.data.jsonl import read_jsonl, write_jsonl
from megatron_ivr.data.rejection_sampling import sampled_responses


def pass_rates(eval_records: list[dict]) -> dict[str, float]:
    """{prompt id: the share of its sampled responses the grader accepted}."""
    rates = {}
    for record in eval_records:
        drawn = sampled_responses(record)
        if not drawn:
            raise ValueError(f"eval record {record['id']!r} has an empty list of sampled responses")
        rates[record["id"]] = sum(d["accuracy"] >= 1.0 for d in drawn) / len(drawn)
    return rates


def learnability(pass_rate: float) -> float:
    """``p (1 - p)``: the variance of a 0/1 reward with success probability ``p``."""
    return pass_rate * (1.0 - pass_rate)


def learnability_pool(rates: dict[str, float], prompts: dict[str, dict], size: int, seed: int,
                      by_family: bool = False) -> list[dict]:
    """``size`` rows drawn with replacement from the prompts of ``rates`` (:func:`pass_rates`)
    with weight ``p (1 - p)`` (``by_family``: normalised within each family, times the family's
    share of the prompts).

    Each row is the prompt file's row with ``id`` = ``<id>~<k>`` (the k-th copy, so that ids
    stay unique) and ``pass_rate`` = p. The draw is fixed by ``seed``.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    missing = [pid for pid in rates if pid not in prompts]
    if missing:
        raise KeyError(f"eval records {missing[:3]} are not in the prompt file")
    ids = sorted(rates)
    weights = [learnability(rates[pid]) for pid in ids]
    if not any(weights):
        raise ValueError(f"no prompt of {len(ids)} is learnable: the policy got every one always right or "
                         "always wrong (p (1 - p) = 0); sample more responses per prompt or use other prompts")
    if by_family:
        family_of = {pid: prompts[pid].get("family") for pid in ids}
        members, mass = Counter(family_of.values()), Counter()
        for pid, weight in zip(ids, weights):
            mass[family_of[pid]] += weight
        weights = [weight / mass[family_of[pid]] * members[family_of[pid]] if weight else 0.0
                   for pid, weight in zip(ids, weights)]
    drawn = random.Random(seed).choices(ids, weights=weights, k=size)
    copies: Counter = Counter()
    rows = []
    for pid in drawn:
        rows.append({**prompts[pid], "id": f"{pid}~{copies[pid]}", "pass_rate": rates[pid]})
        copies[pid] += 1
    return rows


def write_learnability_pool(samples_path: str | Path, prompts_path: str | Path, out_path: str | Path,
                            size: int, seed: int, by_family: bool = False) -> dict:
    """Read ``eval_train_samples.jsonl`` and its prompt file; write the weighted pool to
    ``out_path`` (atomically); return what a person checks: prompts evaluated, how many were
    never / always solved, distinct prompts drawn, and per family the prompts evaluated, their
    mean pass rate and the share of the pool."""
    rates = pass_rates(read_jsonl(samples_path))
    prompts = {row["id"]: row for row in read_jsonl(prompts_path)}
    rows = learnability_pool(rates, prompts, size, seed, by_family)
    write_jsonl(out_path, rows)
    families: dict[str, dict] = {}
    for pid, rate in rates.items():
        entry = families.setdefault(str(prompts[pid].get("family")),
                                    {"prompts": 0, "pass_rate": 0.0, "pool_share": 0.0})
        entry["prompts"] += 1
        entry["pass_rate"] += rate
    for entry in families.values():
        entry["pass_rate"] = round(entry["pass_rate"] / entry["prompts"], 4)
    for family, count in Counter(str(row.get("family")) for row in rows).items():
        families[family]["pool_share"] = round(count / len(rows), 4)
    return {"prompts": len(rates), "never_solved": sum(r == 0.0 for r in rates.values()),
            "always_solved": sum(r == 1.0 for r in rates.values()), "rows": len(rows),
            "distinct": len({row["id"].rsplit("~", 1)[0] for row in rows}), "families": families}

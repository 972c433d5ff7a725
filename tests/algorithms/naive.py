"""Deliberately naive reference implementations: explicit Python loops over responses and
tokens, written straight from shared/spec/algorithms.md, to check the vectorized code."""

from __future__ import annotations

import math
import statistics


def advantages(rewards: list[float], group_ids: list[int], eps: float = 1e-6, by_std: bool = True) -> list[float]:
    out = []
    for i, r in enumerate(rewards):
        group = [rewards[j] for j in range(len(rewards)) if group_ids[j] == group_ids[i]]
        mean = sum(group) / len(group)
        if not by_std:
            out.append(r - mean)
        elif len(group) < 2:
            out.append(0.0)
        else:
            out.append((r - mean) / (statistics.stdev(group) + eps))
    return out


def token_losses(logp, old, adv, rectified, eps_low, eps_high, gamma, tis=None):
    """Per-token loss to minimize: -min(rho A, clip(rho) A) (x TIS) or -f(p) A for rectified."""
    rows = []
    for i in range(len(logp)):
        row = []
        for t in range(len(logp[i])):
            a = adv[i][t]
            if rectified[i]:
                p = math.exp(logp[i][t])
                row.append(-(p / (p + gamma)) * a)
            else:
                rho = math.exp(logp[i][t] - old[i][t])
                clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
                value = -min(rho * a, clipped * a)
                if tis is not None:
                    value *= tis[i][t]
                row.append(value)
        rows.append(row)
    return rows


def aggregate(values, mask, mode):
    if mode == "token-mean":
        total, count = 0.0, 0
        for i in range(len(values)):
            for t in range(len(values[i])):
                if mask[i][t]:
                    total += values[i][t]
                    count += 1
        return total / max(count, 1)
    per_row = []
    for i in range(len(values)):
        valid = [values[i][t] for t in range(len(values[i])) if mask[i][t]]
        if not valid:
            continue  # a fully padded row counts in no mean
        per_row.append(sum(valid) / len(valid) if mode == "seq-mean-token-mean" else sum(valid))
    return sum(per_row) / max(len(per_row), 1)


def k3(logp, ref):
    return [[math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1 for t in range(len(logp[i]))]
            for i in range(len(logp))]


def psi(w, mask):
    out = []
    for i in range(len(w)):
        valid = [w[i][t] for t in range(len(w[i])) if mask[i][t]]
        mean = sum(valid) / len(valid) if valid else 0.0
        out.append([1 + (w[i][t] - mean) if mask[i][t] else 1.0 for t in range(len(w[i]))])
    return out


def overlong(length, max_length, cache):
    if length <= max_length - cache:
        return 0.0
    if length <= max_length:
        return ((max_length - cache) - length) / cache
    return -1.0

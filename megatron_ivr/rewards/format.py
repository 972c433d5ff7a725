"""Format reward of spec section 1: 1 when the response follows the output template, else 0.

- ``ivr``: ``<desc>...</desc>`` then ``<think>...</think>`` then a final ``\\boxed{...}``.
- ``r1``: ``<think>...</think>`` then ``\\boxed{...}``.

Each tag appears exactly once, with non-empty content, in that order; after ``</think>`` only
the boxed answer (with optional surrounding text of at most one short line) may follow.
"""

from __future__ import annotations

import re

from megatron_ivr.rewards.extract import last_boxed

_PATTERNS = {
    "ivr": re.compile(r"^\s*<desc>(?P<desc>.+?)</desc>\s*<think>(?P<think>.+?)</think>(?P<tail>.*)$", re.S),
    "r1": re.compile(r"^\s*<think>(?P<think>.+?)</think>(?P<tail>.*)$", re.S),
}
_TAGS = {"ivr": ("<desc>", "</desc>", "<think>", "</think>"), "r1": ("<think>", "</think>")}


def format_reward(response: str, template: str = "ivr") -> float:
    if template not in _PATTERNS:
        raise ValueError(f"unknown output template {template!r}; choose from {list(_PATTERNS)}")
    if any(response.count(tag) != 1 for tag in _TAGS[template]):
        return 0.0
    match = _PATTERNS[template].match(response)
    if match is None or not match.group("think").strip():
        return 0.0
    if template == "ivr" and not match.group("desc").strip():
        return 0.0
    tail = match.group("tail")
    boxed = last_boxed(tail)
    if boxed is None or not boxed:
        return 0.0
    return 1.0

"""Accuracy reward of spec section 1: grade the last ``\\boxed{}`` against the ground truth.

Graders, tried in order:
1. multiple choice, when the ground truth is a single option letter (A-H): the prediction's
   letter, read from ``B``, ``(B)``, ``B.``, ``\\text{B}`` or ``B) text``;
2. math equivalence with ``math-verify`` (numbers, fractions, LaTeX, sets, units, percent);
3. plain numbers within a relative tolerance (``0.3333`` vs ``1/3`` when asked).

Refused on purpose (graded 0): an answer holding a control character (NUL included) or a
decimal digit other than ASCII 0-9 (fullwidth ``３``, Arabic-Indic ``٣``, ...). Python and
sympy read such digits as numbers, so without this ``\\boxed{３}`` would earn the reward of
``3``; a policy would be paid for code points that the benchmarks' graders, and the people
reading the answers, do not take for the answer. Normalising them (NFKC) would also accept
look-alikes; refusing is the stricter and simpler contract.

These run in worker processes (see :mod:`megatron_ivr.rewards.pool`): math-verify's own
time limits use ``signal.alarm`` and only work in a process's main thread.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from fractions import Fraction
from typing import Optional

from megatron_ivr.rewards.extract import last_boxed

_CHOICE_GOLD = re.compile(r"^\(?([A-H])\)?\.?$")
_CHOICE_PRED = re.compile(r"^\s*(?:\\text\{)?\s*\(?([A-Ha-h])\)?(?:\}|[.):\s]|$)")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$|^[-+]?\d+/\d+$")


def choice_letter(text: str) -> Optional[str]:
    match = _CHOICE_PRED.match(text.strip())
    return match.group(1).upper() if match else None


def _as_number(text: str) -> Optional[float]:
    text = text.replace(",", "").replace("\\!", "").strip().strip("$")
    if not _NUMBER.match(text):
        return None
    return float(Fraction(text)) if "/" in text else float(text)


def numbers_close(pred: str, gold: str, rel_tol: float) -> bool:
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return False
    return abs(a - b) <= rel_tol * max(1.0, abs(b))


def math_equal(pred: str, gold: str, timeout_s: int) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=configs, parsing_timeout=timeout_s)
    pred_parsed = parse(f"${pred}$", extraction_config=configs, parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def has_refused_characters(text: str) -> bool:
    """A control character (other than tab and newlines) or a non-ASCII decimal digit."""
    return any((unicodedata.category(ch) == "Cc" and ch not in "\t\n\r") or
               (unicodedata.category(ch) == "Nd" and not ch.isascii()) for ch in text)


def grade_answer(pred: Optional[str], gold: str, rel_tol: float = 1e-4, timeout_s: int = 5) -> float:
    """1.0 when the extracted prediction equals the ground truth, else 0.0."""
    if pred is None or not pred.strip() or has_refused_characters(pred):
        return 0.0
    gold = gold.strip()
    gold_choice = _CHOICE_GOLD.match(gold)
    if gold_choice:
        return float(choice_letter(pred) == gold_choice.group(1))
    if numbers_close(pred, gold, rel_tol):
        return 1.0
    try:
        return float(math_equal(pred, gold, timeout_s))
    except Exception:  # math-verify raises on some inputs; an ungradable answer earns 0
        return 0.0


def load_grader() -> None:
    """Import math-verify (sympy) ahead of the first answer: a grading worker's warm-up."""
    import math_verify  # noqa: F401


def accuracy_reward(response: str, gold: str, rel_tol: float = 1e-4, timeout_s: int = 5) -> float:
    """Spec section 1 ``r_accuracy``: grade the last boxed answer; no box gives 0."""
    return grade_answer(last_boxed(response), gold, rel_tol, timeout_s)

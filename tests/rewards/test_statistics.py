"""The baselines beside an accuracy (megatron_ivr/rewards/statistics.py), on hand-made records
whose every number is worked out here."""

from __future__ import annotations

import pytest

from megatron_ivr.rewards.statistics import (
    answer_prior,
    answer_statistics,
    extracted_answer,
    majority_vote,
)


def test_a_prior_policy_scores_the_majority_share_but_not_the_macro_accuracy():
    # gold "1" x3, "2" x1; the policy always answers "1"
    records = [{"family": "f", "answer": a, "accuracy": float(a == "1")} for a in ("1", "1", "1", "2")]
    stats = answer_statistics(records)
    assert stats["majority_share"] == 0.75
    assert stats["accuracy_macro"] == 0.5  # (1.0 on "1" + 0.0 on "2") / 2
    assert "blind_accuracy" not in stats and not any("@" in key for key in stats)


def test_the_blind_guesser_is_the_training_prior_of_each_family():
    prior = answer_prior([("f", "1"), ("f", "1"), ("f", " 2 "), ("f", "3"), ("g", "C")])
    assert prior == {"f": {"1": 0.5, "2": 0.25, "3": 0.25}, "g": {"C": 1.0}}
    records = [{"family": "f", "answer": "1", "accuracy": 0.0}, {"family": "f", "answer": "4", "accuracy": 0.0},
               {"family": "g", "answer": "C", "accuracy": 1.0}]
    stats = answer_statistics(records, prior)
    assert stats["blind_accuracy"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_the_sampled_panel():
    def s(answer, accuracy):
        return {"answer": answer, "accuracy": accuracy}
    records = [
        {"family": "f", "answer": "2", "accuracy": 0.0, "samples": [s("2", 1.0), s("3", 0.0), s("3", 0.0)]},
        {"family": "f", "answer": "1", "accuracy": 1.0, "samples": [s(None, 0.0), s("1", 1.0), s("4", 0.0)]},
    ]
    prior = {"f": {"1": 0.5, "2": 0.5}}
    stats = answer_statistics(records, prior)
    assert stats["mean@3"] == pytest.approx(2 / 6)
    assert stats["maj@3"] == 0.5  # "3" outvotes the right "2"; "1" and "4" tie, "1" came first
    assert stats["pass@3"] == 1.0
    assert stats["blind_pass@3"] == pytest.approx(1 - 0.5**3)
    assert majority_vote([s(None, 0.0)]) == 0.0


def test_extracted_answers_are_compared_as_text():
    assert extracted_answer(r"so \boxed{ 3 }") == "3"
    assert extracted_answer(r"\boxed{a  b} then \boxed{C}") == "C"
    assert extracted_answer("no box") is None

"""Rollout metrics of a step (megatron_ivr/training/experience.py)."""

from __future__ import annotations

import pytest

from megatron_ivr.training.experience import family_accuracy


def test_family_accuracy_pools_each_familys_responses():
    groups = [("union", [1.0, 0.0, 0.0, 0.0]), ("count", [1.0, 1.0]), ("union", [1.0, 1.0]), (None, [0.0]),
              ("compare", [])]
    assert family_accuracy(groups) == {"reward/accuracy/count": 1.0,
                                       "reward/accuracy/union": pytest.approx(0.5)}
    assert family_accuracy([]) == {}

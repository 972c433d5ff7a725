"""Accuracy reward (spec section 1): the last boxed answer graded against the ground truth."""

from __future__ import annotations

import pytest

from megatron_ivr.rewards import accuracy_reward, last_boxed

# (response, ground truth, expected reward)
CASES = [
    # plain numbers
    (r"\boxed{6}", "6", 1.0),
    (r"\boxed{7}", "6", 0.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{0.5}", "0.5", 1.0),
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{0.334}", "0.3333", 0.0),  # outside the tolerance
    (r"\boxed{2.00001}", "2", 1.0),  # inside the 1e-4 relative tolerance
    (r"\boxed{2.01}", "2", 0.0),
    # fractions and LaTeX
    (r"\boxed{\frac12}", "0.5", 1.0),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{3/4}", "0.75", 1.0),
    (r"\boxed{\frac{2}{3}}", "0.75", 0.0),
    (r"\boxed{\sqrt{2}}", r"\sqrt 2", 1.0),
    (r"\boxed{2\pi}", r"2\pi", 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{x^2+1}", "x^2+2x+1", 0.0),
    (r"\boxed{x=3}", "3", 1.0),
    # sets and intervals
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),
    (r"\boxed{\{1,3\}}", r"\{2,1\}", 0.0),
    # units, percent, degrees
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{12 apples}", "12", 1.0),
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{10^\circ}", "10", 1.0),
    # multiple choice: predictable letters
    (r"\boxed{B}", "B", 1.0),
    (r"\boxed{(B)}", "B", 1.0),
    (r"\boxed{B.}", "B", 1.0),
    (r"\boxed{\text{B}}", "B", 1.0),
    (r"\boxed{B) more circles}", "B", 1.0),
    (r"\boxed{b}", "B", 1.0),
    (r"\boxed{C}", "B", 0.0),
    (r"\boxed{(A)}", "(B)", 0.0),
    (r"\boxed{A}", "(A)", 1.0),
    # no box, empty box, unclosed box
    ("The answer is 6.", "6", 0.0),
    (r"\boxed{}", "6", 0.0),
    (r"\boxed{6", "6", 0.0),
    ("<answer>6</answer>", "6", 0.0),
    # the last box counts, nested braces are balanced
    (r"first \boxed{5} then \boxed{6}", "6", 1.0),
    (r"first \boxed{6} then \boxed{5}", "6", 0.0),
    (r"\boxed{\frac{\frac{1}{2}}{2}}", "0.25", 1.0),
    (r"\boxed{{6}}", "6", 1.0),
    (r"<think>2+4</think> \boxed {6}", "6", 1.0),
    # garbage never raises
    (r"\boxed{\frac{1}{}", "6", 0.0),
    (r"\boxed{)(}", "6", 0.0),
]


def test_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("response, gold, expected", CASES)
def test_accuracy(response, gold, expected):
    assert accuracy_reward(response, gold) == expected


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{a{b}c}", "a{b}c"),
    (r"x \boxed{1} y \boxed{2}", "2"),
    (r"\boxed{1} \boxed{2", "1"),  # an unclosed last box falls back to the last closed one
    ("no box", None),
    (r"\fbox{4}", "4"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected

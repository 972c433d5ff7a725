"""Question families over a scene, each with an exact answer.

- ``count``: how many objects.
- ``count_attr``: how many objects match a predicate ("red objects", "large squares").
- ``subtract``: CLEVR/MathVista style "Subtract all X. Subtract all Y. How many objects are
  left?".
- ``compare``: which of two counts is larger, as multiple choice (A/B/C).
- ``arithmetic``: the sum or the product of two counts.
- ``union``: how many objects match either of two predicates ("Count the objects that are red
  objects or circles, each object once"): an object matching both counts once. No SFT trace
  answers it, but the subtract trace removes exactly these objects: the demo's family learned
  from answers alone (docs/results.md).
- ``sum``: the number of X plus the number of Y (arithmetic's sums only).

Each question carries the reasoning steps that a correct response states, so that the
reference response (and its corrupted variants) can be written from the same facts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_ivr.config.schema import QUESTION_FAMILIES
from megatron_ivr.data.synthetic.scene import COLORS, MATERIALS, SHAPES, SIZES, SceneObject

FAMILIES = QUESTION_FAMILIES  # the names, kept beside the config that selects them
# families whose gold answers are drawn uniformly from these (the generator's draw_question):
# no answer prior to learn, so a gain on them is a gain in looking
BALANCED_ANSWERS = {"union": ("1", "2", "3", "4")}


@dataclass
class Question:
    family: str
    text: str
    answer: str
    predicates: list[dict] = field(default_factory=list)  # the sets counted, in order
    op: str = ""  # how the counts combine: total, count, minus, compare, plus, times, or
    choices: list[str] = field(default_factory=list)


def noun(predicate: dict) -> str:
    """Plural noun phrase of a predicate: {'color': 'red', 'shape': 'circle'} -> 'red circles'."""
    words = [predicate[k] for k in ("size", "color", "material") if k in predicate]
    head = predicate["shape"] + "s" if "shape" in predicate else "objects"
    return " ".join(words + [head])


def random_predicate(rng: random.Random, scene: list[SceneObject]) -> dict:
    """A predicate that usually (not always) matches something in the scene."""
    anchor = rng.choice(scene)
    shown = set(anchor.shown)
    options = [kinds for kinds in PREDICATE_KINDS if shown.issuperset(kinds)]
    kinds = rng.choice(options)
    predicate = {k: getattr(anchor, k) for k in kinds}
    if rng.random() < 0.15:  # sometimes ask about something absent
        key = kinds[0]
        pool = {"color": list(COLORS), "shape": SHAPES, "size": SIZES, "material": MATERIALS}[key]
        predicate[key] = rng.choice(pool)
    return predicate


PREDICATE_KINDS = (("color",), ("shape",), ("size",), ("material",), ("color", "shape"), ("size", "shape"),
                   ("size", "color"))


def count(scene: list[SceneObject], predicate: dict) -> int:
    return sum(obj.matches(predicate) for obj in scene)


def make_question(family: str, scene: list[SceneObject], rng: random.Random) -> Question:
    if family == "count":
        return Question(family, "How many objects are there in the image?", str(len(scene)), [{}], "total")
    if family == "count_attr":
        p = random_predicate(rng, scene)
        return Question(family, f"How many {noun(p)} are there in the image?", str(count(scene, p)), [p], "count")
    if family == "subtract":
        p1, p2 = random_predicate(rng, scene), random_predicate(rng, scene)
        left = sum(not (o.matches(p1) or o.matches(p2)) for o in scene)
        text = f"Subtract all {noun(p1)}. Subtract all {noun(p2)}. How many objects are left?"
        return Question(family, text, str(left), [p1, p2], "minus")
    if family == "compare":
        p1, p2 = _two_predicates(rng, scene)
        a, b = count(scene, p1), count(scene, p2)
        choices = [f"more {noun(p1)}", f"more {noun(p2)}", "the same number"]
        letter = "A" if a > b else "B" if b > a else "C"
        options = " ".join(f"({L}) {c}" for L, c in zip("ABC", choices))
        text = (f"Are there more {noun(p1)} or more {noun(p2)} in the image? "
                f"Options: {options}. Answer with the option's letter.")
        return Question(family, text, letter, [p1, p2], "compare", choices)
    if family == "arithmetic":
        p1, p2 = random_predicate(rng, scene), random_predicate(rng, scene)
        op = rng.choice(["plus", "times"])
        a, b = count(scene, p1), count(scene, p2)
        value = a + b if op == "plus" else a * b
        text = f"What is the number of {noun(p1)} {op} the number of {noun(p2)}?"
        return Question(family, text, str(value), [p1, p2], op)
    if family == "union":
        p1, p2 = _two_predicates(rng, scene)
        either = sum(o.matches(p1) or o.matches(p2) for o in scene)
        # worded unlike count_attr ("How many X are there"): with the same words, RL on union
        # taught count_attr to over-count too (docs/results.md, the design probes)
        text = f"Count the objects that are {noun(p1)} or {noun(p2)}, each object once. How many are there?"
        return Question(family, text, str(either), [p1, p2], "or")
    if family == "sum":
        p1, p2 = random_predicate(rng, scene), random_predicate(rng, scene)
        text = f"What is the number of {noun(p1)} plus the number of {noun(p2)}?"
        return Question(family, text, str(count(scene, p1) + count(scene, p2)), [p1, p2], "plus")
    raise ValueError(f"unknown question family {family!r}; choose from {FAMILIES}")


def _two_predicates(rng: random.Random, scene: list[SceneObject]) -> tuple[dict, dict]:
    """Two different predicates (compare, union)."""
    p1, p2 = random_predicate(rng, scene), random_predicate(rng, scene)
    while p2 == p1:
        p2 = random_predicate(rng, scene)
    return p1, p2


def final_answer(question: Question, counts: list[int], total: int, left: int | None = None) -> str:
    """The answer implied by (possibly wrong) counts: used to write corrupted responses."""
    if question.op == "total":
        return str(total)
    if question.op == "count":
        return str(counts[0])
    if question.op == "minus":
        return str(left)
    if question.op == "compare":
        a, b = counts
        return "A" if a > b else "B" if b > a else "C"
    if question.op == "plus":
        return str(counts[0] + counts[1])
    if question.op == "times":
        return str(counts[0] * counts[1])
    raise ValueError(question.op)

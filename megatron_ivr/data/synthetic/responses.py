"""Step-by-step reference responses, and the re-reasoning examples built from them.

A response is written from a *description* of the scene. The reference response describes
the true scene; a wrong response describes a corrupted scene (one object misread or
missed), so its reasoning is internally consistent but visually wrong: exactly the
"grounding erosion" IVR-R1 trains the policy to localize and rectify.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Optional

from megatron_ivr.data.synthetic.questions import Question, count, final_answer, noun
from megatron_ivr.data.synthetic.scene import COLORS, MATERIALS, SHAPES, SIZES, SceneObject

DESCRIPTION_STYLES = ("full", "compact", "cells", "counts")
# the order in which a ``counts`` description names kinds: colour, then shape, size, material
_KIND_RANK = {name: i for i, name in enumerate(list(COLORS) + list(SHAPES) + list(SIZES) + list(MATERIALS))}


def describe(objects: list[SceneObject], style: str = "full") -> str:
    """``full``: every object with its grid position; ``compact``: the objects in reading order
    without positions; ``cells``: every cell of the board in reading order, row by row, empty
    ones included (the k-th item always describes the k-th cell: the easiest to read off an
    image for a small model); ``counts``: how many of each kind, kinds in a fixed order
    (colour, then shape), no positions."""
    if style not in DESCRIPTION_STYLES:
        raise ValueError(f"unknown description style {style!r}; choose from {DESCRIPTION_STYLES}")
    if style == "counts" and objects:
        kinds: dict[str, int] = {}
        for o in description_order(objects, style):
            name = o.phrase()[2:]
            kinds[name] = kinds.get(name, 0) + 1
        parts = [f"{n} {name}{'s' if n > 1 else ''}" for name, n in kinds.items()]
        return f"The image shows {len(objects)} objects: " + ", ".join(parts) + "."
    if style == "cells":
        grid = objects[0].grid if objects else 3
        by_cell = {(o.row, o.col): o.phrase()[2:] for o in objects}
        rows = [", ".join(by_cell.get((r, c), "empty") for c in range(grid)) for r in range(grid)]
        return f"The image shows {len(objects)} objects. " + " ".join(
            f"Row {r + 1}: {row}." for r, row in enumerate(rows))
    if not objects:
        return "The image shows no objects."
    if style == "compact":
        return f"The image shows {len(objects)} objects: " + ", ".join(o.phrase() for o in objects) + "."
    items = "; ".join(f"{o.phrase()} at the {o.where()}" for o in objects)
    return f"The image shows {len(objects)} objects: {items}."


def description_order(objects: list[SceneObject], style: str) -> list[SceneObject]:
    """The objects in the order the description names them: by kind (colour, then shape) for
    ``counts``, as given (reading order) for the other styles. The reasoning lists objects in
    this order, so that it reads off the description, as the prompt asks."""
    if style != "counts":
        return list(objects)
    return sorted(objects, key=lambda o: tuple(_KIND_RANK[v] for v in (o.color, o.shape, o.size, o.material)))


def _listing(objects: list[SceneObject], predicate: dict) -> tuple[int, str]:
    hits = [o for o in objects if o.matches(predicate)]
    if not hits:
        return 0, f"there are no {noun(predicate)}, so 0"
    return len(hits), f"the {noun(predicate)} are " + ", ".join(o.phrase() for o in hits) + f", so {len(hits)}"


def reasoning(objects: list[SceneObject], question: Question) -> tuple[str, str]:
    """(think text, final answer) derived only from the described objects."""
    preds = question.predicates
    if question.op == "total":
        n = len(objects)
        return f"Counting every object in the description gives {n}.", str(n)
    if question.op == "minus":
        removed = [o for o in objects if any(o.matches(p) for p in preds)]
        left = len(objects) - len(removed)
        names = ", ".join(o.phrase() for o in removed) or "nothing"
        text = (f"Start with {len(objects)} objects. Removing the {noun(preds[0])} and the "
                f"{noun(preds[1])} removes {len(removed)} ({names}). {len(objects)} - {len(removed)} = {left}.")
        return text, str(left)
    if question.op == "or":
        either = [o for o in objects if o.matches(preds[0]) or o.matches(preds[1])]
        names = ", ".join(o.phrase() for o in either) or "nothing"
        text = (f"The {noun(preds[0])} or {noun(preds[1])} are {names}, counting an object that is both "
                f"once, so {len(either)}.")
        return text, str(len(either))
    counts, parts = [], []
    for p in preds:
        k, sentence = _listing(objects, p)
        counts.append(k)
        parts.append(sentence[0].upper() + sentence[1:] + ".")
    answer = final_answer(question, counts, len(objects))
    if question.op == "compare":
        a, b = counts
        relation = "greater than" if a > b else "less than" if a < b else "equal to"
        parts.append(f"{a} is {relation} {b}, so the answer is option ({answer}).")
    elif question.op in ("plus", "times"):
        symbol = "+" if question.op == "plus" else "x"
        parts.append(f"{counts[0]} {symbol} {counts[1]} = {answer}.")
    return " ".join(parts), answer


def write_response(objects: list[SceneObject], question: Question, template: str = "ivr",
                   style: str = "full") -> str:
    """A full response in the output template (spec section 1); ``style`` of the description."""
    think, answer = reasoning(description_order(objects, style), question)
    body = f"<think>{think}</think>\n\\boxed{{{answer}}}"
    if template == "ivr":
        return f"<desc>{describe(objects, style)}</desc>\n{body}"
    if template == "r1":
        return body
    raise ValueError(f"unknown output template {template!r}")


@dataclass
class Corruption:
    objects: list[SceneObject]
    critique: str


def corrupt(scene: list[SceneObject], question: Question, rng: random.Random,
            tries: int = 30) -> Optional[Corruption]:
    """Misread or miss one object so that the final answer changes; None when no edit does."""
    _, truth = reasoning(scene, question)
    pools = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "material": list(MATERIALS)}
    pools = {key: values for key, values in pools.items() if key in scene[0].shown}
    for _ in range(tries):
        index = rng.randrange(len(scene))
        original = scene[index]
        if rng.random() < 0.25 and len(scene) > 1:
            objects = scene[:index] + scene[index + 1:]
            mistake = f"it leaves out {original.phrase()} at the {original.where()}"
        else:
            attribute = rng.choice(list(pools))
            wrong = rng.choice([v for v in pools[attribute] if v != getattr(original, attribute)])
            changed = dataclasses.replace(original, **{attribute: wrong})
            objects = scene[:index] + [changed] + scene[index + 1:]
            mistake = (f"it describes the object at the {original.where()} as {changed.phrase()}, "
                       f"but the image shows {original.phrase()}")
        _, wrong_answer = reasoning(objects, question)
        if wrong_answer != truth:
            counted = " and ".join(f"{count(scene, p)} {noun(p)}" for p in question.predicates if p)
            fix = f" Re-counting from the image gives {counted}." if counted else ""
            critique = (f"The first wrong step is the description in <desc>: {mistake}. "
                        f"The reasoning that follows inherits this error, so the answer {wrong_answer} "
                        f"is wrong.{fix}")
            return Corruption(objects, critique)
    return None

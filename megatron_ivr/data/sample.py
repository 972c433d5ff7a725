"""The sample schema: what every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from PIL import Image


@dataclass
class Sample:
    """One query of a visual-reasoning dataset.

    ``images`` are decoded RGB images already resized by Qwen's rules
    (:func:`megatron_ivr.data.images.resize_for_qwen`). ``reasoning`` is an optional
    reference response (SFT traces); ``family`` tags the question type when known.
    """

    id: str
    images: list[Image.Image]
    question: str
    answer: str
    reasoning: Optional[str] = None
    family: Optional[str] = None
    meta: dict = field(default_factory=dict)


@dataclass
class BadSample:
    """A sample that failed validation: reported by id and skipped, never fatal alone."""

    id: str
    reason: str
    source: str = ""

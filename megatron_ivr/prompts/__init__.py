"""The prompts of both papers as editable template files (spec section 6).

Templates use ``string.Template`` placeholders (``$question``), so the LaTeX braces in
``\\boxed{}`` need no escaping. ``response`` asks for an answer in the chosen output
template (``ivr``: ``<desc>`` + ``<think>`` + ``\\boxed{}``; ``r1``: the VICRA paper's
appendix D prompt); ``localize`` asks for the IVR-R1 step-level critique of a failed
response, with the image re-injected; ``rectify`` asks for a corrected full response given
the failed response and its critique; ``describe`` asks for a text description of the
image (IVR-R1's ``rectify_with=description`` ablation).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from string import Template

PROMPT_NAMES = ("response", "localize", "rectify", "describe")
OUTPUT_TEMPLATES = ("ivr", "r1")


@cache
def _read(name: str) -> Template:
    text = resources.files(__package__).joinpath("templates", f"{name}.txt").read_text("utf-8")
    return Template(text.strip())


def format_instruction(template: str) -> str:
    if template not in OUTPUT_TEMPLATES:
        raise ValueError(f"unknown output template {template!r}; choose from {OUTPUT_TEMPLATES}")
    return _read(f"format_{template}").template


def render_prompt(name: str, template: str, **fields: str) -> str:
    """Fill prompt ``name`` for output ``template``; a missing field raises ``KeyError``."""
    if name not in PROMPT_NAMES:
        raise ValueError(f"unknown prompt {name!r}; choose from {PROMPT_NAMES}")
    return _read(name).substitute(format_instruction=format_instruction(template), **fields)


def chat_messages(text: str, num_images: int) -> list[dict]:
    """One user turn: the images first (Qwen's convention), then the prompt text."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


def chat_prompt(templater, text: str, num_images: int) -> str:
    """The generation prompt for one user turn, rendered by a tokenizer's or processor's chat
    template (one ``<|image_pad|>`` per image; the processor or server expands it)."""
    return templater.apply_chat_template(chat_messages(text, num_images), tokenize=False, add_generation_prompt=True)

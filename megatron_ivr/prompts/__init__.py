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


def sample_prompt(sample, template: str) -> str:
    """The prompt text a sample is trained on: a chat row's own prompt (``meta["prompt"]``),
    else the response prompt of the run's output template."""
    return sample.meta.get("prompt") or render_prompt("response", template, question=sample.question)


def prompt_length(templater, text: str, image_sizes: list[tuple[int, int]], factor: int) -> int:
    """Tokens of the chat prompt for ``text`` with images of these (width, height) (already
    resized to multiples of ``factor``): the template's tokens plus each image's
    ``(w / factor) * (h / factor)`` merged patch tokens in place of its one placeholder."""
    ids = templater.tokenizer(chat_prompt(templater, text, len(image_sizes)))["input_ids"]
    return len(ids) + sum((w // factor) * (h // factor) - 1 for w, h in image_sizes)

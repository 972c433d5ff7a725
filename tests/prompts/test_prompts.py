"""The prompt templates (spec section 6): tags, image re-examination, final boxed answer."""

from __future__ import annotations

import pytest

from megatron_ivr.prompts import chat_messages, format_instruction, render_prompt


@pytest.mark.parametrize("template, tags", [
    ("ivr", ["<desc>", "<think>", "\\boxed{"]),
    ("r1", ["<think>", "\\boxed{"]),
])
def test_response_prompt_names_the_template(template, tags):
    text = render_prompt("response", template, question="How many cubes?")
    assert text.startswith("How many cubes?")
    compact = text.replace(" }", "}").replace("{ ", "{")
    for tag in tags:
        assert tag.rstrip("{") in compact


def test_r1_prompt_is_the_vicra_appendix_d_prompt():
    assert format_instruction("r1").startswith("You FIRST think about the reasoning process as an internal monologue")


@pytest.mark.parametrize("template", ["ivr", "r1"])
def test_rectify_and_localize_re_examine_the_image(template):
    localize = render_prompt("localize", template, question="Q?", response="R")
    rectify = render_prompt("rectify", template, question="Q?", response="R", critique="C")
    for text in (localize, rectify):
        assert "Re-examine the image" in text and "Q?" in text and "<response>\nR\n</response>" in text
    assert "<critique>\nC\n</critique>" in rectify
    assert format_instruction(template) in rectify  # the corrected response follows the template
    assert "\\boxed" not in localize  # a critique gives no final answer


def test_missing_field_and_unknown_names_fail():
    with pytest.raises(KeyError):
        render_prompt("rectify", "ivr", question="Q", response="R")
    with pytest.raises(ValueError):
        render_prompt("response", "xml", question="Q")
    with pytest.raises(ValueError):
        render_prompt("summarize", "ivr", question="Q")


def test_chat_messages_put_images_first():
    messages = chat_messages("hi", 2)
    assert [item["type"] for item in messages[0]["content"]] == ["image", "image", "text"]

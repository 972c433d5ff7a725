"""A key a user sets must change behaviour or be refused: every field of every config
dataclass is read somewhere outside ``megatron_ivr/config/`` (as an attribute, e.g.
``cfg.data.max_prompt_tokens``). A field that nothing reads fails here: wire it or remove it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from megatron_ivr.config.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]
SOURCES = [REPO / "megatron_ivr", REPO / "model_providers", REPO / "launch"]


def _attributes_read() -> set[str]:
    names: set[str] = set()
    for root in SOURCES:
        for path in root.rglob("*.py"):
            if "config" in path.relative_to(root).parts[:1]:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    names.add(node.attr)
    return names


def test_every_config_field_is_read_outside_config():
    import typing

    read = _attributes_read()
    unread = []

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name not in read:
                unread.append(prefix + field.name)
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], prefix + field.name + ".")

    walk(RunConfig, "")
    assert unread == [], f"config fields that nothing outside config/ reads: {unread}"


def test_the_check_sees_what_it_should():
    read = _attributes_read()
    assert {"max_prompt_tokens", "max_source_pixels", "skip_zero_advantage"} <= read
    assert not {"shuffle_seed", "jsonl", "context_parallel"} & read  # the keys removed as unused

"""The synthetic task: deterministic, exact answers, held-out family, SFT and re-reasoning data."""

from __future__ import annotations

import hashlib
import json

import pytest

from megatron_ivr.config.schema import SyntheticDataConfig
from megatron_ivr.data.synthetic import generate_dataset
from megatron_ivr.data.synthetic.questions import FAMILIES, Question, count, make_question
from megatron_ivr.data.synthetic.responses import reasoning
from megatron_ivr.data.synthetic.scene import SceneObject
from megatron_ivr.rewards import accuracy_reward, format_reward


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != "manifest.json":
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_by_seed(tmp_path):
    kwargs = dict(num_train=12, num_val=5, num_test=5)
    a = generate_dataset(SyntheticDataConfig(output_dir=str(tmp_path / "a"), seed=7, **kwargs))
    b = generate_dataset(SyntheticDataConfig(output_dir=str(tmp_path / "b"), seed=7, **kwargs))
    generate_dataset(SyntheticDataConfig(output_dir=str(tmp_path / "c"), seed=8, **kwargs))
    assert a["families"] == b["families"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_held_out_family_only_outside_train(synthetic_dir):
    train = {r["family"] for r in _jsonl(synthetic_dir / "train.jsonl")}
    test = {r["family"] for r in _jsonl(synthetic_dir / "test.jsonl")}
    assert "arithmetic" not in train and train == set(FAMILIES) - {"arithmetic"}
    assert test == set(FAMILIES)


def test_answers_are_exact_from_the_scene(synthetic_dir):
    for split in ("train", "test"):
        for row in _jsonl(synthetic_dir / f"{split}.jsonl"):
            scene = [SceneObject(**o) for o in row["scene"]]
            text = row["question"]
            if row["family"] == "count":
                assert row["answer"] == str(len(scene))
            elif row["family"] == "compare":
                assert row["answer"] in "ABC" and len(row["choices"]) == 3
            assert row["answer"].lstrip("-").isdigit() or row["answer"] in "ABC", text


def test_family_arithmetic_by_hand():
    scene = [SceneObject("circle", "red", "large", "metal", 0, 0), SceneObject("square", "red", "small", "matte", 0, 1),
             SceneObject("circle", "blue", "small", "matte", 1, 1)]
    assert count(scene, {"color": "red"}) == 2 and count(scene, {"shape": "circle"}) == 2
    subtract = Question("subtract", "", "", [{"color": "red"}, {"shape": "circle"}], "minus")
    assert reasoning(scene, subtract)[1] == "0"
    times = Question("arithmetic", "", "", [{"color": "red"}, {"size": "small"}], "times")
    assert reasoning(scene, times)[1] == "4"
    compare = Question("compare", "", "", [{"color": "blue"}, {"shape": "square"}], "compare")
    assert reasoning(scene, compare)[1] == "C"
    with pytest.raises(ValueError):
        make_question("riddle", scene, __import__("random").Random(0))


def test_sft_references_earn_full_reward(synthetic_dir):
    rows = _jsonl(synthetic_dir / "sft.jsonl")
    assert len(rows) == 100
    for row in rows:
        response = row["messages"][1]["content"]
        assert row["messages"][0]["role"] == "user" and "\\boxed" in row["messages"][0]["content"]
        assert format_reward(response, "ivr") == 1.0
        assert accuracy_reward(response, row["answer"]) == 1.0, row["id"]


def test_rereasoning_examples_fail_then_get_rectified(synthetic_dir):
    rows = _jsonl(synthetic_dir / "rereasoning.jsonl")
    assert len(rows) >= 80  # almost every scene has a corruption that changes the answer
    for row in rows:
        assert format_reward(row["failed_response"], "ivr") == 1.0  # well-formed but wrong
        assert accuracy_reward(row["failed_response"], row["answer"]) == 0.0
        assert accuracy_reward(row["rectified_response"], row["answer"]) == 1.0
        assert "<desc>" in row["critique"] and row["failed_response"] in row["rectify_prompt"]
        assert row["critique"] in row["rectify_prompt"]


def test_task_options_shape_the_scenes_and_descriptions(tmp_path):
    import json

    cfg = SyntheticDataConfig(output_dir=str(tmp_path), num_train=40, num_val=0, num_test=0, grid=3, image_size=84,
                              attributes=["color", "shape"], num_colors=2, min_objects=1, max_objects=6,
                              description="cells")
    generate_dataset(cfg)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    for row, trace in zip(rows, sft):
        assert all(o["color"] in ("red", "green") and o["size"] == "large" and o["material"] == "matte"
                   and 0 <= o["row"] < 3 and 0 <= o["col"] < 3 for o in row["scene"])
        assert not any(word in row["question"] for word in ("metal", "matte", "small", "large"))
        desc = trace["reasoning"].split("</desc>")[0]
        items = [x.strip() for part in desc.split("Row ")[1:] for x in part.split(":", 1)[1].rstrip(". ").split(",")]
        assert len(items) == 9 and sum(x != "empty" for x in items) == len(row["scene"])
        for o in row["scene"]:
            assert items[o["row"] * 3 + o["col"]] == f"{o['color']} {o['shape']}"
    assert (tmp_path / "rereasoning_sft.jsonl").exists()


def test_board_size_must_hold_the_objects():
    import pytest

    from megatron_ivr.config import ConfigError

    with pytest.raises(ConfigError, match="synthetic.max_objects"):
        SyntheticDataConfig(grid=2, max_objects=5).validate()


def test_counts_reasoning_reads_the_objects_in_the_descriptions_order():
    """With the ``counts`` description the reasoning lists the objects kind by kind, in the
    order the description names the kinds (not the board's reading order), so that a policy
    can copy its reasoning off its own description, as the prompt asks."""
    import re

    from megatron_ivr.data.synthetic.responses import write_response

    shown = ("color", "shape")
    board = [("circle", "yellow", 0, 0), ("square", "red", 0, 1), ("square", "yellow", 1, 0),
             ("circle", "yellow", 2, 2)]
    scene = [SceneObject(shape, color, "large", "matte", row, col, shown) for shape, color, row, col in board]
    question = Question("count_attr", "How many yellow objects are there in the image?", "3", [{"color": "yellow"}],
                        "count")
    text = write_response(scene, question, "ivr", "counts")
    desc = re.search(r"<desc>(.*)</desc>", text).group(1)
    assert desc == "The image shows 4 objects: 1 red square, 2 yellow circles, 1 yellow square."
    assert "The yellow objects are a yellow circle, a yellow circle, a yellow square, so 3." in text
    # the other styles keep the board's reading order in both
    compact = write_response(scene, question, "ivr", "compact")
    assert "a yellow circle, a red square, a yellow square, a yellow circle." in compact
    assert "The yellow objects are a yellow circle, a yellow square, a yellow circle, so 3." in compact

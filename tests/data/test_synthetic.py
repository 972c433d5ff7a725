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
    families = set(SyntheticDataConfig().families)
    assert "arithmetic" not in train and train == families - {"arithmetic"}
    assert test == families and families < set(FAMILIES)
    assert not (synthetic_dir / "rl.jsonl").exists()  # num_rl = 0: no RL pool


DEMO_LIKE = dict(families=["count", "count_attr", "subtract", "compare", "union"], held_out_family="union",
                 attributes=["color", "shape"], num_colors=4, grid=3, image_size=84, min_objects=1, max_objects=6)


def test_test_split_leads_with_the_held_out_family(tmp_path):
    """Every family gets an equal share of val and test; the held-out family alternates with
    the others first, so the first 2 * share questions hold all of it and equal parts of the rest
    (the demo evaluates the first 512 of 1,280: 256 union + 64 of each other family)."""
    cfg = SyntheticDataConfig(output_dir=str(tmp_path), num_train=8, num_val=0, num_test=40, **DEMO_LIKE)
    generate_dataset(cfg)
    families = [r["family"] for r in _jsonl(tmp_path / "test.jsonl")]
    assert {f: families.count(f) for f in set(families)} == dict.fromkeys(DEMO_LIKE["families"], 8)
    prefix = families[:16]
    assert prefix[0::2] == ["union"] * 8 and sorted(prefix[1::2]) == sorted(["count", "count_attr", "subtract",
                                                                             "compare"] * 2)
    assert "union" not in families[16:]
    assert "union" not in {r["family"] for r in _jsonl(tmp_path / "train.jsonl")}


def test_rl_pool_is_answer_only_on_its_own_scenes(tmp_path):
    cfg = SyntheticDataConfig(output_dir=str(tmp_path), num_train=40, num_val=0, num_test=0, num_rl=48,
                              rl_families=["union", "count_attr", "union", "compare"], **DEMO_LIKE)
    manifest = generate_dataset(cfg)
    rows = _jsonl(tmp_path / "rl.jsonl")
    assert manifest["families"]["rl"] == {"union": 24, "count_attr": 12, "compare": 12}
    assert [r["family"] for r in rows[:4]] == ["union", "count_attr", "union", "compare"]
    assert all(set(r) == {"id", "images", "question", "answer", "family", "split", "choices"} for r in rows)
    assert all((tmp_path / r["images"][0]).exists() for r in rows)
    train_images = {(tmp_path / r["images"][0]).read_bytes() for r in _jsonl(tmp_path / "train.jsonl")}
    rl_images = [(tmp_path / r["images"][0]).read_bytes() for r in rows]
    assert sum(image in train_images for image in rl_images) <= 2  # independent draws (a 1-object board may repeat)
    sft_questions = {r["question"] for r in _jsonl(tmp_path / "sft.jsonl")}
    assert any(r["question"].startswith("Count the objects that are") for r in rows)
    assert not any(q.startswith("Count the objects that are") for q in sft_questions)  # no union trace


def test_union_answers_are_balanced_and_exact(tmp_path):
    """union counts an object matching both predicates once; its gold answers are drawn
    uniformly from 1-4 (BALANCED_ANSWERS), so its answer prior is flat."""
    cfg = SyntheticDataConfig(output_dir=str(tmp_path), num_train=0, num_val=0, num_test=0, num_rl=400,
                              rl_families=["union"], **DEMO_LIKE)
    generate_dataset(cfg)
    rows = _jsonl(tmp_path / "rl.jsonl")
    answers = [r["answer"] for r in rows]
    assert set(answers) == {"1", "2", "3", "4"} and max(answers.count(a) for a in "1234") < 0.33 * len(rows)
    scene = [SceneObject("circle", "red", "large", "matte", 0, 0), SceneObject("square", "red", "large", "matte", 0, 1),
             SceneObject("circle", "blue", "large", "matte", 1, 1),
             SceneObject("square", "green", "large", "matte", 2, 2)]
    union = Question("union", "", "", [{"color": "red"}, {"shape": "circle"}], "or")
    think, answer = reasoning(scene, union)
    assert answer == "3" and "counting an object that is both once, so 3" in think
    assert make_question("union", scene, __import__("random").Random(1)).op == "or"
    summed = make_question("sum", scene, __import__("random").Random(1))
    p1, p2 = summed.predicates
    assert summed.answer == str(count(scene, p1) + count(scene, p2)) and summed.op == "plus"


@pytest.mark.parametrize("field, value, message", [
    ("families", ["count", "riddle"], "unknown family 'riddle'"),
    ("held_out_family", "sum", "must be one of synthetic.families"),
    ("rl_families", ["count", "riddle"], "unknown family 'riddle'"),
    ("num_rl", 8, "must name the RL pool's families"),
    ("families", ["count", "count"], "each family once"),
])
def test_family_settings_are_validated(field, value, message):
    from megatron_ivr.config import ConfigError

    with pytest.raises(ConfigError, match=message) as caught:
        SyntheticDataConfig(**{field: value}).validate()
    assert caught.value.key == f"synthetic.{'rl_families' if field == 'num_rl' else field}"


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

"""Dataset reading: validation by sample id, skipping bad rows, the bad-share limit, Parquet."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_ivr.data import DataError, ImageRules, read_dataset
from megatron_ivr.data.images import resize_for_qwen


def _rows(synthetic_dir, split="train"):
    return [json.loads(line) for line in (synthetic_dir / f"{split}.jsonl").read_text().splitlines()]


def test_three_percent_broken_samples_are_reported_exactly_and_skipped(synthetic_dir, tmp_path):
    rows = _rows(synthetic_dir)
    assert len(rows) == 100
    for row in rows:  # absolute paths so the copy can live elsewhere
        row["images"] = [str(synthetic_dir / p) for p in row["images"]]
    png = (synthetic_dir / "images/train_00010.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    rows[10]["images"] = [str(tmp_path / "does_not_exist.png")]  # missing file
    rows[42]["images"] = [str(tmp_path / "truncated.png")]         # truncated PNG
    rows[77]["answer"] = "  "                                      # empty answer
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    dataset = read_dataset(path, max_bad_fraction=0.05, allow_outside_root=True)
    assert len(dataset.samples) == 97
    assert sorted(b.id for b in dataset.bad) == ["train-00010", "train-00042", "train-00077"]
    reasons = {b.id: b.reason for b in dataset.bad}
    assert "not found" in reasons["train-00010"]
    assert "cannot decode" in reasons["train-00042"]
    assert "answer" in reasons["train-00077"]
    assert dataset.metrics()["data/bad_samples"] == 3
    assert dataset.bad_fraction == pytest.approx(0.03)
    # the same file fails as a whole when the limit is below the bad share, naming the offenders
    with pytest.raises(DataError, match=r"3 of 100 samples are bad.*train-00010"):
        read_dataset(path, max_bad_fraction=0.02, allow_outside_root=True)


def test_invalid_json_line_and_empty_question_are_bad_samples(tmp_path, synthetic_dir):
    image = str(synthetic_dir / "images/train_00000.png")
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"id": "ok", "question": "<image>How many?", "answer": "3", "images": [image]}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "blank", "question": "<image> ", "answer": "3", "images": [image]}) + "\n"
        + json.dumps({"id": "text-only", "problem": "What is 2+2?", "answer": 4}) + "\n"
    )
    dataset = read_dataset(path, max_bad_fraction=1.0, allow_outside_root=True)
    assert [s.id for s in dataset.samples] == ["ok", "text-only"]
    assert dataset.samples[0].question == "How many?"  # <image> placeholder removed
    assert dataset.samples[1].images == [] and dataset.samples[1].answer == "4"
    assert {b.id for b in dataset.bad} == {"mixed.jsonl:2", "blank"}


def test_parquet_with_image_bytes_in_the_vlm_rl_layout(tmp_path, synthetic_dir):
    png = (synthetic_dir / "images/train_00001.png").read_bytes()
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    table = pa.table({
        "problem": ["<image>Count the red objects.", "<image>Broken image?", "<image>Uri?"],
        "answer": ["2", "1", "5"],
        "images": [[{"bytes": png, "path": None}], [{"bytes": b"\x89PNG junk", "path": None}],
                   [{"bytes": None, "path": data_uri}]],
    })
    path = tmp_path / "train.parquet"
    pq.write_table(table, path)
    dataset = read_dataset(path, max_bad_fraction=0.5)
    assert [s.id for s in dataset.samples] == ["train:0", "train:2"]
    assert [b.id for b in dataset.bad] == ["train:1"]
    assert dataset.samples[0].images[0].mode == "RGB"


@pytest.mark.parametrize("size, factor, min_pixels, max_pixels, expected", [
    ((112, 112), 28, 3136, 12544, (112, 112)),      # already conforming: untouched
    ((100, 300), 28, 3136, 12544, (56, 168)),       # too many pixels: scaled down, multiples of 28
    ((20, 20), 28, 3136, 12544, (56, 56)),          # too few: scaled up to min_pixels
    ((640, 480), 32, 1024, 256 * 256, (288, 192)),  # Qwen3-VL factor
])
def test_qwen_resizing_rules(size, factor, min_pixels, max_pixels, expected):
    image = Image.new("RGB", size)
    out = resize_for_qwen(image, factor, min_pixels, max_pixels)
    assert out.size == expected
    assert out.width % factor == 0 and out.height % factor == 0
    assert min_pixels <= out.width * out.height <= max_pixels


def test_reader_applies_the_resizing_rules(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (300, 100), "red").save(buffer, format="PNG")
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "1",
                                "image": base64.b64encode(buffer.getvalue()).decode()}) + "\n")
    # a bare base64 string is not a path: it is reported, not guessed at
    assert read_dataset(path, max_bad_fraction=1.0).bad[0].id == "a"
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "1", "image": uri}) + "\n")
    sample = read_dataset(path, ImageRules(factor=28, min_pixels=3136, max_pixels=12544)).samples[0]
    assert sample.images[0].size == (168, 56)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported dataset format"):
        read_dataset(tmp_path / "data.csv")


def test_image_paths_that_leave_the_dataset_folder_are_refused(synthetic_dir, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((synthetic_dir / "images/train_00000.png").read_bytes())
    rows = [{"id": "inside", "question": "q", "answer": "1", "images": ["images/a.png"]},
            {"id": "dotdot", "question": "q", "answer": "1", "images": ["../../etc/hostname"]},
            {"id": "absolute", "question": "q", "answer": "1",
             "images": [str(synthetic_dir / "images/train_00000.png")]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = read_dataset(path, max_bad_fraction=1.0)
    assert [s.id for s in dataset.samples] == ["inside"]
    assert {b.id: "leaves the dataset folder" in b.reason for b in dataset.bad} == {"dotdot": True, "absolute": True}
    allowed = read_dataset(path, max_bad_fraction=1.0, allow_outside_root=True)
    assert [s.id for s in allowed.samples] == ["inside", "absolute"]  # ../../etc/hostname is no image


def test_an_images_folder_linked_into_the_dataset_folder_counts_as_inside(synthetic_dir, tmp_path):
    """Datasets on shared storage are often linked in: the path as written decides, links are
    not followed; a written ``..`` through the link still leaves."""
    (tmp_path / "images").symlink_to(synthetic_dir / "images", target_is_directory=True)
    rows = [{"id": "linked", "question": "q", "answer": "1", "images": ["images/train_00000.png"]},
            {"id": "dotdot", "question": "q", "answer": "1", "images": ["images/../../train.jsonl"]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = read_dataset(path, max_bad_fraction=1.0)
    assert [s.id for s in dataset.samples] == ["linked"]
    assert [b.id for b in dataset.bad] == ["dotdot"] and "leaves the dataset folder" in dataset.bad[0].reason


def test_a_line_of_invalid_utf8_is_reported_by_line_and_skipped(synthetic_dir, tmp_path):
    good = (synthetic_dir / "train.jsonl").read_bytes().splitlines()[:3]
    path = synthetic_dir / "utf8_test.jsonl"
    try:
        path.write_bytes(b"\n".join([good[0], b'{"question": "\xff\xfe", "answer": "1"}', good[1], good[2]]) + b"\n")
        dataset = read_dataset(path, max_bad_fraction=0.5)
    finally:
        path.unlink()
    assert len(dataset.samples) == 3
    assert dataset.bad[0].id == "utf8_test.jsonl:2" and "invalid UTF-8" in dataset.bad[0].reason


def test_chat_rows_carry_their_own_prompt(synthetic_dir):
    dataset = read_dataset(synthetic_dir / "rereasoning_sft.jsonl", ImageRules(28, 3136, 12544), limit=2)
    critique, rectify = dataset.samples
    assert critique.id.endswith("/critique") and critique.meta["prompt"].startswith("Question:")
    assert "first wrong step" in critique.reasoning
    assert rectify.reasoning.startswith("<desc>") and "<critique>" in rectify.meta["prompt"]


def test_answer_pairs_read_no_image_and_skip_bad_rows(tmp_path):
    from megatron_ivr.data.readers import answer_pairs

    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "q", "answer": "1", "family": "count", "images": ["missing.png"]}\n'
                    'not json\n{"question": "q", "answer": " C ", "family": "compare"}\n'
                    '{"question": "q", "answer": "", "family": "count"}\n')
    assert list(answer_pairs(path)) == [("count", "1"), ("compare", "C")]


def test_a_blanked_image_is_its_most_common_colour():
    from PIL import Image, ImageDraw

    from megatron_ivr.data.images import blank_like

    image = Image.new("RGB", (90, 60), (250, 240, 200))
    ImageDraw.Draw(image).rectangle((10, 10, 30, 30), fill=(200, 0, 0))
    blank = blank_like(image)
    assert blank.size == (90, 60) and blank.mode == "RGB"
    assert blank.getcolors() == [(90 * 60, (250, 240, 200))]

"""The benchmark readers on small fixtures made here in each benchmark's published layout
(Parquet with image bytes, JSON/JSONL with image paths, TSV with base64 images), each with a
broken row that must be reported by its id and skipped."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_ivr.data import DataError
from megatron_ivr.data.benchmarks import BENCHMARKS, benchmark_prompt, read_benchmark


def png(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def image_file(folder: Path, name: str) -> str:
    (folder / Path(name).parent).mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(png())
    return name


def check(dataset, n_good: int, bad_id: str, reason: str):
    assert len(dataset.samples) == n_good
    assert [b.id for b in dataset.bad] == [bad_id]
    assert reason in dataset.bad[0].reason
    for sample in dataset.samples:
        assert sample.images and all(img.size[0] % 28 == 0 for img in sample.images)
    return {s.id: s for s in dataset.samples}


def test_mathvista_parquet_and_json(tmp_path):
    meta = {"task": "geometry problem solving"}
    rows = [
        {"pid": "1", "question": "Which angle is larger?", "choices": ["30", "60"], "answer": "60",
         "question_type": "multi_choice", "answer_type": "text", "precision": None, "metadata": meta,
         "image": "images/1.jpg", "decoded_image": {"bytes": png(), "path": "1.jpg"}},
        {"pid": "2", "question": "Length of AB?", "choices": None, "answer": "1.45", "question_type": "free_form",
         "answer_type": "float", "precision": 2.0, "metadata": meta, "image": "images/2.jpg",
         "decoded_image": {"bytes": png(), "path": "2.jpg"}},
        {"pid": "3", "question": "Broken", "choices": None, "answer": "4", "question_type": "free_form",
         "answer_type": "integer", "precision": None, "metadata": meta, "image": "images/3.jpg",
         "decoded_image": {"bytes": b"not an image", "path": "3.jpg"}},
    ]
    by_id = check(read_benchmark("mathvista", write_parquet(tmp_path / "testmini.parquet", rows)), 2, "3", "image 0")
    assert by_id["1"].answer == "B" and by_id["1"].meta["answer_type"] == "letter"
    assert by_id["1"].meta["choices"] == ["30", "60"] and "B. 60" in by_id["1"].question
    assert by_id["2"].meta == {"choices": [], "answer_type": "number", "precision": 2}
    assert by_id["1"].family == "geometry problem solving"
    # the original JSON: a dict pid -> record with image paths beside it
    folder = tmp_path / "json"
    records = {r["pid"]: {k: v for k, v in r.items() if k != "decoded_image"} for r in rows}
    image_file(folder, "images/1.jpg")
    image_file(folder, "images/2.jpg")  # 3 has no file
    (folder / "testmini.json").write_text(json.dumps(records))
    by_id = check(read_benchmark("mathvista", folder / "testmini.json"), 2, "3", "image 0")
    assert by_id["2"].answer == "1.45"


def test_mathverse_parquet_with_problem_versions(tmp_path):
    rows = [
        {"sample_index": "1", "problem_index": "1", "problem_version": "Text Dominant",
         "question": "As shown, find x.\nChoices:\nA:2\nB:3", "image": {"bytes": png(), "path": None},
         "answer": "B", "question_type": "multi-choice", "query_wo": "..."},
        {"sample_index": "2", "problem_index": "1", "problem_version": "Vision Only", "question": "",
         "image": {"bytes": png(), "path": None}, "answer": "3", "question_type": "free-form",
         "query_wo": "According to the question shown in the image, answer it."},
        {"sample_index": "3", "problem_index": "2", "problem_version": "Text Lite", "question": "x?",
         "image": {"bytes": png(), "path": None}, "answer": None, "question_type": "free-form", "query_wo": ""},
    ]
    by_id = check(read_benchmark("mathverse", write_parquet(tmp_path / "testmini.parquet", rows)), 2, "3",
                  "missing answer")
    assert by_id["1"].answer == "B" and by_id["1"].meta["answer_type"] == "letter"
    assert by_id["2"].question.startswith("According to the question shown")  # vision-only: the query text
    assert {s.family for s in by_id.values()} == {"Text Dominant", "Vision Only"}


def test_mathvision_jsonl_with_image_paths(tmp_path):
    image_file(tmp_path, "images/1.jpg")
    image_file(tmp_path, "images/2.jpg")
    rows = [{"id": "1", "question": "How many?", "options": ["1", "2", "3", "4", "5"], "image": "images/1.jpg",
             "answer": "C", "solution": None, "level": 2, "subject": "counting"},
            {"id": "2", "question": "Area?", "options": [], "image": "images/2.jpg", "answer": "12",
             "level": 3, "subject": "metric geometry - area"},
            {"id": "3", "question": "Angle?", "options": [], "image": "images/missing.jpg", "answer": "30",
             "level": 1, "subject": "angle"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    by_id = check(read_benchmark("mathvision", tmp_path / "test.jsonl"), 2, "3", "image 0")
    assert by_id["1"].answer == "C" and "E. 5" in by_id["1"].question
    assert by_id["2"].meta["answer_type"] == "number" and by_id["2"].family == "metric geometry - area"


def test_mmstar_tsv_with_base64_images(tmp_path):
    b64 = base64.b64encode(png()).decode()
    lines = ["index\tquestion\tA\tB\tC\tD\tanswer\tcategory\tl2-category\timage",
             f"0\tWhat colour is it?\tred\tblue\tgreen\tgrey\tA\tcoarse perception\tcolor\t{b64}",
             f"1\tHow many?\t1\t2\t3\t4\tD\tmath\tnumeric\t{b64}",
             "2\tBroken row\t1\t2\t3\t4\tB\tmath\tnumeric\t"]
    (tmp_path / "MMStar.tsv").write_text("\n".join(lines) + "\n")
    by_id = check(read_benchmark("mmstar", tmp_path / "MMStar.tsv"), 2, "2", "image 0: missing")
    assert by_id["0"].meta["choices"] == ["red", "blue", "green", "grey"] and by_id["0"].answer == "A"
    assert by_id["1"].family == "math"


def test_mmstar_parquet_keeps_options_in_the_question(tmp_path):
    rows = [{"index": 0, "question": "Which? Options: A: x, B: y", "image": {"bytes": png(), "path": None},
             "answer": "B", "category": "logical reasoning", "l2_category": "code"},
            {"index": 1, "question": "Which? Options: A: x, B: y", "image": {"bytes": png(), "path": None},
             "answer": "A", "category": "math", "l2_category": "geometry"},
            {"index": 2, "question": "   ", "image": {"bytes": png(), "path": None}, "answer": "A",
             "category": "math", "l2_category": "geometry"}]
    by_id = check(read_benchmark("mmstar", write_parquet(tmp_path / "val.parquet", rows)), 2, "2", "empty question")
    assert by_id["0"].question == "Which? Options: A: x, B: y" and by_id["0"].meta["choices"] == []


def _mmmu_row(key, question, options, answer, images, question_type="multiple-choice"):
    row = {"id": key, "question": question, "options": options, "explanation": "", "answer": answer,
           "img_type": "['Diagrams']", "topic_difficulty": "Medium", "question_type": question_type,
           "subfield": "x"}
    for n in range(1, 8):
        row[f"image_{n}"] = images.get(n)
    return row


def test_mmmu_folder_of_subject_files_with_placeholders(tmp_path):
    img = {"bytes": png(), "path": "a.png"}
    accounting = [
        _mmmu_row("validation_Accounting_1", "Compare <image 2> with <image 1>.", "['<image 1>', 'neither']", "A",
                  {1: img, 2: {"bytes": png((0, 0, 200)), "path": "b.png"}}),
        _mmmu_row("validation_Accounting_2", "Total cost?", "[]", "120", {1: img}, question_type="open"),
    ]
    math = [_mmmu_row("validation_Math_1", "Pick one <image 1>.", "['1', '2'", "B", {1: img})]  # broken options
    write_parquet(tmp_path / "Accounting" / "validation-00000-of-00001.parquet", accounting)
    write_parquet(tmp_path / "Math" / "validation-00000-of-00001.parquet", math)
    by_id = check(read_benchmark("mmmu", tmp_path), 2, "validation_Math_1", "")
    first = by_id["validation_Accounting_1"]
    assert first.question.startswith("Compare [image 1] with [image 2].")  # renumbered by first appearance
    assert len(first.images) == 2 and first.images[0].getpixel((0, 0)) == (0, 0, 200)  # image_2 comes first
    assert first.meta["choices"] == ["[image 1]", "neither"] and first.answer == "A"
    assert first.family == "Accounting"
    assert by_id["validation_Accounting_2"].meta["answer_type"] == "text"


def test_mmmu_pro_standard_and_vision(tmp_path):
    img = {"bytes": png(), "path": "a.png"}
    options = str([f"opt{i}" for i in range(10)])
    standard = [dict(_mmmu_row("s1", "Which <image 1>?", options, "J", {1: img}), subject="Art"),
                dict(_mmmu_row("s2", "Which?", options, "opt3", {1: img}), subject="Art"),
                dict(_mmmu_row("s3", "Which?", options, "Z", {1: img}), subject="Art")]
    by_id = check(read_benchmark("mmmu_pro", write_parquet(tmp_path / "standard.parquet", standard)), 2, "s3",
                  "neither an option letter")
    assert by_id["s1"].answer == "J" and by_id["s2"].answer == "D" and "J. opt9" in by_id["s1"].question
    vision = [{"id": "v1", "image": img, "options": options, "answer": "C", "subject": "Math"},
              {"id": "v2", "image": img, "options": options, "answer": "A", "subject": "Math"},
              {"id": "v3", "image": None, "options": options, "answer": "A", "subject": "Math"}]
    by_id = check(read_benchmark("mmmu_pro", write_parquet(tmp_path / "vision.parquet", vision)), 2, "v3", "")
    assert by_id["v1"].question.startswith("Answer the question in the image.")


def test_wemath_json(tmp_path):
    image_file(tmp_path, "1.png")
    rows = [{"ID": "1@1steps_1", "split": "testmini", "knowledge concept": "Angles", "question": "Angle x?",
             "option": "A. 30°; B. 45°; C. 60°; D. 90°; E. No correct answer", "answer": "B",
             "image_path": "1.png", "key": "1steps"},
            {"ID": "2@2steps_1", "split": "testmini", "knowledge concept": "Area", "question": "Area?",
             "option": "A. 1; B. 2", "answer": "A", "image_path": "1.png", "key": "2steps"},
            {"ID": "3@3steps_1", "split": "testmini", "knowledge concept": "Area", "question": "Area?",
             "option": "A. 1; B. 2", "answer": "A", "image_path": "../outside.png", "key": "3steps"}]
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    by_id = check(read_benchmark("wemath", tmp_path / "testmini.json"), 2, "3@3steps_1", "image 0")
    assert by_id["1@1steps_1"].meta["choices"] == ["30°", "45°", "60°", "90°", "No correct answer"]
    assert by_id["2@2steps_1"].family == "Area"


def test_dynamath_parquet(tmp_path):
    rows = [{"id": "1", "question": "Value at x=2?", "image": "images/1.png",
             "decoded_image": {"bytes": png(), "path": None}, "ground_truth": "4.5", "answer_type": "float",
             "subject": "algebra", "knowledge_level": "high school"},
            {"id": "2", "question": "Which graph? A: f B: g", "image": "images/2.png",
             "decoded_image": {"bytes": png(), "path": None}, "ground_truth": "B",
             "answer_type": "multiple choice", "subject": "graph theory", "knowledge_level": "undergraduate"},
            {"id": "3", "question": "Broken", "image": "images/3.png", "decoded_image": None,
             "ground_truth": "1", "answer_type": "float", "subject": "algebra", "knowledge_level": "x"}]
    by_id = check(read_benchmark("dynamath", write_parquet(tmp_path / "sample_variant1.parquet", rows)), 2, "3",
                  "image 0")
    assert by_id["1"].meta["answer_type"] == "number" and by_id["2"].meta["answer_type"] == "letter"


def test_logicvista_json_with_several_letters(tmp_path):
    image_file(tmp_path, "images/a.png")
    data = {"0": {"imagename": "a.png", "question": "Which two?", "answer": "A, C", "skill": ["spatial"]},
            "1": {"imagename": "a.png", "question": "Which?", "answer": "B", "skill": ["deductive"]},
            "2": {"imagename": "a.png", "question": "Which?", "skill": ["inductive"]}}
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    by_id = check(read_benchmark("logicvista", tmp_path / "dataset.json"), 2, "2", "answer")
    assert by_id["0"].answer == "A, C" and by_id["0"].family == "spatial"


def test_every_benchmark_has_a_reader_and_unknown_names_are_refused(tmp_path):
    assert set(BENCHMARKS) == {"mathvista", "mathverse", "mathvision", "mmstar", "mmmu", "mmmu_pro", "wemath",
                               "dynamath", "logicvista"}
    with pytest.raises(DataError, match="unknown benchmark"):
        read_benchmark("mathvistaa", tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_benchmark("mathvista", tmp_path / "nope.parquet")
    assert benchmark_prompt("Q?", ["x", "y"]) == "Q?\nChoices:\nA. x\nB. y\nAnswer with the option's letter."

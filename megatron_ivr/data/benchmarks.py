"""Readers for the public benchmarks the papers report, in the file layouts they ship in.

Each benchmark maps its rows to :class:`Sample` objects with the fields the grader needs:
``answer`` (an option letter for multiple choice, else the reference value),
``meta["choices"]`` (option texts, listed in the prompt as ``A. ...``), ``meta["answer_type"]``
(``letter`` | ``number`` | ``text``), ``meta["precision"]`` (decimals a number is graded at,
when the benchmark gives one) and ``family`` (the subset that results are broken down by).
A broken row is reported by its id and skipped, like every dataset (data/readers.py).

Layouts (where to get each file: docs/evaluation.md):

=============  ==========================================================================
mathvista      testmini: HF Parquet (``decoded_image`` bytes) or the original JSON (a dict
               pid -> record, ``image`` a path); subset = ``metadata.task``
mathverse      testmini: HF Parquet (``image`` bytes) or the original JSON list (``image``
               a path); options inside the question; subset = ``problem_version``
mathvision     HF Parquet (``decoded_image``) or the original JSONL (``image`` a path);
               ``options`` list; subset = ``subject``
mmstar         HF Parquet (``image`` bytes) or VLMEvalKit TSV (base64 ``image``, ``A``-``D``
               columns); subset = ``category``
mmmu           validation: HF Parquet, one file per subject or a folder of them;
               ``options`` a Python-literal list, ``image_1`` ... ``image_7``, ``<image n>``
               placeholders; subset = the subject
mmmu_pro       HF Parquet, ``standard`` (like MMMU, 10 options) or ``vision`` (the question
               is in the screenshot ``image``); subset = ``subject``
wemath         testmini JSON list (``option`` ``"A. ...; B. ..."``, ``image_path``);
               subset = ``knowledge concept``
dynamath       HF Parquet (``decoded_image``, ``ground_truth``, ``answer_type``); subset =
               ``subject``
logicvista     ``dataset.json`` (a dict id -> record, images in ``images/<imagename>``);
               answers may name several letters; subset = ``skill``
=============  ==========================================================================
"""

from __future__ import annotations

import ast
import base64
import csv
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from megatron_ivr.config.schema import BENCHMARK_NAMES
from megatron_ivr.data.images import ImageError, decode_image, regular_file, resize_for_qwen
from megatron_ivr.data.readers import DataError, ImageRules, LoadedDataset, parquet_batches
from megatron_ivr.data.sample import BadSample, Sample

logger = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJ"
ID_KEYS = ("pid", "id", "ID", "index", "sample_index", "__key__")  # how each benchmark names a row
_PLACEHOLDER = re.compile(r"<image (\d+)>")


# --- files -> raw rows -----------------------------------------------------------------------
def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        if not found:
            raise DataError(f"{path}: no {'/'.join(suffixes)} files inside")
        return found
    try:
        regular_file(path, "benchmark file")
    except OSError as exc:
        raise DataError(f"{exc.strerror}: {path}") from None
    return [path]


def _lines(file: Path) -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` of a text file; ``text`` is None for a line that is not UTF-8."""
    with open(file, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, None


def iter_raw_rows(path: Path) -> Iterator[tuple[Path, dict]]:
    """(file, row) for Parquet, JSON (a list, or a dict of id -> record), JSONL and TSV files
    (a folder: every such file in it). A row that cannot be parsed becomes ``{"__error__"}``."""
    for file in _files(path, (".parquet", ".json", ".jsonl", ".tsv")):
        suffix = file.suffix.lower()
        if suffix == ".parquet":
            for batch in parquet_batches(file, 64):
                for row in batch.to_pylist():
                    yield file, row
        elif suffix == ".json":
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
                raise DataError(f"{file}: not a readable JSON file: {str(exc)[:200]}") from None
            if not isinstance(data, (dict, list)):
                raise DataError(f"{file}: a JSON benchmark file holds a list or an object of records")
            items = data.items() if isinstance(data, dict) else enumerate(data)
            for key, row in items:
                yield file, dict(row, __key__=str(key)) if isinstance(row, dict) else \
                    {"__key__": str(key), "__error__": "record is not a JSON object"}
        elif suffix == ".jsonl":
            for line_no, line in _lines(file):
                key = f"{file.name}:{line_no}"
                if line is None:
                    yield file, {"__key__": key, "__error__": "line is not valid UTF-8"}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    row = {"__key__": key, "__error__": f"invalid JSON: {str(exc)[:200] or 'nested too deeply'}"}
                yield file, row if isinstance(row, dict) else {"__key__": key, "__error__": "not a JSON object"}
        else:  # VLMEvalKit TSV: base64 images can exceed csv's default field limit
            csv.field_size_limit(sys.maxsize)
            with open(file, newline="", encoding="utf-8", errors="replace") as fh:  # a bad byte: that row only
                for row in csv.DictReader(fh, delimiter="\t"):
                    yield file, row if not any("\ufffd" in str(v) for v in row.values()) else \
                        {"__key__": row.get("index"), "__error__": "row is not valid UTF-8"}


# --- shared helpers ----------------------------------------------------------------------------
def _image_ref(value) -> Any:
    """A Parquet image struct ({bytes, path}) with no bytes falls back to its path."""
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        return value["path"]
    return value


def _letter_of(answer: str, choices: list[str]) -> str:
    """The option letter of ``answer``: itself when it is a letter, else its position."""
    answer = str(answer).strip()
    if len(answer) == 1 and answer.upper() in LETTERS[:len(choices) or len(LETTERS)]:
        return answer.upper()
    if answer in choices:
        return LETTERS[choices.index(answer)]
    raise ValueError(f"answer {answer!r} is neither an option letter nor one of the options")


def _options_list(value) -> list[str]:
    """Options as a list: a list, a Python-literal list string (MMMU), or None."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        parsed = ast.literal_eval(value)  # literals only: safe on untrusted text
        if not isinstance(parsed, list):
            raise ValueError(f"options {value!r} is not a list")
        return [str(v) for v in parsed]
    return [str(v) for v in value]


def _number_type(answer_type: Optional[str], answer: str) -> str:
    if answer_type in ("integer", "float") or re.fullmatch(r"-?\d+(\.\d+)?", str(answer).strip()):
        return "number"
    return "text"


def _entry(key, question, answer, images, *, choices=(), answer_type=None, precision=None, subset=None) -> dict:
    return {"id": str(key), "question": question, "answer": answer, "images": images, "choices": list(choices),
            "answer_type": answer_type, "precision": precision, "subset": subset}


# --- one mapping per benchmark: raw row -> entry ------------------------------------------------
def mathvista(row: dict, file: Path) -> dict:
    choices = _options_list(row.get("choices"))
    multi = row.get("question_type") == "multi_choice"
    answer = _letter_of(row["answer"], choices) if multi else row["answer"]
    metadata = row.get("metadata") or {}
    image = _image_ref(row.get("decoded_image")) or row.get("image")
    precision = row.get("precision")
    if multi or row.get("answer_type") != "float" or not isinstance(precision, (int, float)) or precision != precision:
        precision = None  # only float answers carry a precision (NaN elsewhere in the Parquet file)
    return _entry(row.get("pid", row.get("__key__")), row["question"], answer, [image], choices=choices,
                  answer_type="letter" if multi else _number_type(row.get("answer_type"), row["answer"]),
                  precision=int(precision) if precision is not None else None,
                  subset=metadata.get("task") or row.get("question_type"))


def mathverse(row: dict, file: Path) -> dict:
    question = row.get("question") or row.get("query_wo") or "Answer the question shown in the image."
    multi = row.get("question_type") == "multi-choice"
    return _entry(row.get("sample_index", row.get("__key__")), question, row["answer"],
                  [_image_ref(row.get("image"))],
                  answer_type="letter" if multi else _number_type(None, row["answer"]),
                  subset=row.get("problem_version"))


def mathvision(row: dict, file: Path) -> dict:
    choices = _options_list(row.get("options"))
    image = _image_ref(row.get("decoded_image")) or row.get("image")
    answer = _letter_of(row["answer"], choices) if choices else row["answer"]
    return _entry(row.get("id", row.get("__key__")), row["question"], answer, [image], choices=choices,
                  answer_type="letter" if choices else _number_type(None, row["answer"]),
                  subset=row.get("subject"))


def mmstar(row: dict, file: Path) -> dict:
    image = row.get("image")
    if file.suffix.lower() == ".tsv":  # VLMEvalKit: base64 image, options in columns A-D
        image = base64.b64decode(image) if image else None
        choices = [row[c] for c in "ABCD" if row.get(c)]
        question = row["question"]
    else:
        choices, question = [], row["question"]  # the HF file keeps "Options: A: ..." in the question
        image = _image_ref(image)
    return _entry(row.get("index", row.get("__key__")), question, row["answer"], [image], choices=choices,
                  answer_type="letter", subset=row.get("category"))


def _mmmu_images(row: dict, question: str, options: list[str]) -> tuple[str, list]:
    """Images in the order their ``<image n>`` placeholders appear (then any unreferenced
    one); placeholders become ``[image k]`` with k counting that order."""
    present = {n: row[f"image_{n}"] for n in range(1, 8) if row.get(f"image_{n}") is not None}
    order = []
    for number in _PLACEHOLDER.findall(question + " " + " ".join(options)):
        if int(number) in present and int(number) not in order:
            order.append(int(number))
    order += [n for n in sorted(present) if n not in order]
    rename = {n: k + 1 for k, n in enumerate(order)}
    text = _PLACEHOLDER.sub(lambda m: f"[image {rename.get(int(m.group(1)), m.group(1))}]", question)
    return text, [_image_ref(present[n]) for n in order]


def mmmu(row: dict, file: Path) -> dict:
    options = _options_list(row.get("options"))
    key = row.get("id", row.get("__key__"))
    if row.get("question") is None and row.get("image") is not None:  # MMMU-Pro "vision": all in the image
        question, images = "Answer the question in the image.", [_image_ref(row["image"])]
    else:
        question, images = _mmmu_images(row, row["question"], options)
    options = [_PLACEHOLDER.sub(lambda m: f"[image {m.group(1)}]", o) for o in options]
    multi = row.get("question_type", "multiple-choice") == "multiple-choice" and bool(options)
    subject = row.get("subject") or ("_".join(str(key).split("_")[1:-1]) or None)
    return _entry(key, question, _letter_of(row["answer"], options) if multi else row["answer"], images,
                  choices=options if multi else [], answer_type="letter" if multi else "text", subset=subject)


_WEMATH_OPTION = re.compile(r"([A-H])\.\s*(.*?)\s*(?=;\s*[A-H]\.|$)", re.S)


def wemath(row: dict, file: Path) -> dict:
    choices = [text for _, text in _WEMATH_OPTION.findall(row.get("option") or "")]
    return _entry(row.get("ID", row.get("__key__")), row["question"], row["answer"], [row.get("image_path")],
                  choices=choices, answer_type="letter" if choices else "text",
                  subset=row.get("knowledge concept"))


def dynamath(row: dict, file: Path) -> dict:
    kind = row.get("answer_type")
    image = _image_ref(row.get("decoded_image")) or row.get("image")
    answer = row.get("ground_truth", row.get("answer"))
    return _entry(row.get("id", row.get("__key__")), row["question"], answer, [image],
                  answer_type="letter" if kind == "multiple choice" else
                  ("number" if kind == "float" else "text"), subset=row.get("subject"))


def logicvista(row: dict, file: Path) -> dict:
    answer = ", ".join(re.findall(r"[A-H]", str(row["answer"]).upper()))
    skill = row.get("skill")
    image = row.get("imagename")
    return _entry(row.get("__key__"), row["question"], answer, [f"images/{image}" if image else None],
                  answer_type="letter", subset=skill[0] if isinstance(skill, list) and skill else skill)


# Columns that decide how a benchmark's answers are graded (multiple choice or not, the answer's
# type, its precision). Each reader falls back when one is absent from a row, so a file whose
# column was renamed would be graded against the wrong gold answer without a word: a file
# whose first record lacks one is refused instead (a DataError naming the column).
GRADING_COLUMNS: dict[str, tuple[str, ...]] = {
    "mathvista": ("question_type", "answer_type", "precision"), "mathverse": ("question_type",),
    "mathvision": ("options",), "wemath": ("option",), "dynamath": ("answer_type",),
}

BENCHMARKS: dict[str, Callable[[dict, Path], dict]] = {
    "mathvista": mathvista, "mathverse": mathverse, "mathvision": mathvision, "mmstar": mmstar, "mmmu": mmmu,
    "mmmu_pro": mmmu, "wemath": wemath, "dynamath": dynamath, "logicvista": logicvista,
}
if set(BENCHMARKS) != set(BENCHMARK_NAMES):  # the names the config accepts are the names read here
    raise ImportError(f"benchmark readers {sorted(BENCHMARKS)} != config.schema.BENCHMARK_NAMES "
                      f"{sorted(BENCHMARK_NAMES)}")


# --- entry -> sample ---------------------------------------------------------------------------
def benchmark_prompt(question: str, choices: list[str]) -> str:
    """The question with its options as ``A. text`` lines, asking for the letter."""
    if not choices:
        return question.strip()
    lines = [f"{LETTERS[i]}. {text}" for i, text in enumerate(choices)]
    return question.strip() + "\nChoices:\n" + "\n".join(lines) + "\nAnswer with the option's letter."


def to_sample(entry: dict, rules: ImageRules, root: Path) -> Sample:
    if not str(entry["question"] or "").strip():
        raise ValueError("empty question")
    if entry["answer"] is None or not str(entry["answer"]).strip():
        raise ValueError("missing answer")
    images = []
    for k, raw in enumerate(entry["images"]):
        if raw is None:
            raise ValueError(f"image {k}: missing")
        try:
            image = decode_image(raw, root, allow_outside_root=False, max_source_pixels=rules.max_source_pixels)
        except ImageError as exc:
            raise ValueError(f"image {k}: {exc}") from None
        images.append(resize_for_qwen(image, rules.factor, rules.min_pixels, rules.max_pixels))
    meta = {"choices": entry["choices"], "answer_type": entry["answer_type"], "precision": entry["precision"]}
    return Sample(id=entry["id"], images=images, question=benchmark_prompt(entry["question"], entry["choices"]),
                  answer=str(entry["answer"]).strip(), family=entry["subset"], meta=meta)


def read_benchmark(name: str, path: str | Path, rules: ImageRules | None = None, limit: Optional[int] = None,
                   max_bad_fraction: float = 1.0) -> LoadedDataset:
    """Read benchmark ``name`` from ``path`` (a file or a folder of files)."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHMARKS))}")
    mapping, path, rules = BENCHMARKS[name], Path(path), rules or ImageRules()
    result = LoadedDataset(samples=[], path=str(path))
    checked: set[Path] = set()
    for index, (file, row) in enumerate(iter_raw_rows(path)):
        if file not in checked and "__error__" not in row:
            checked.add(file)
            missing = [column for column in GRADING_COLUMNS.get(name, ()) if column not in row]
            if missing:
                raise DataError(f"{file}: no column {missing[0]!r}, which the {name} layout grades by (found: "
                                f"{', '.join(k for k in row if not k.startswith('__'))}); refused rather than "
                                f"graded against the wrong gold answer")
        key = next((row[k] for k in ID_KEYS if row.get(k) not in (None, "")), f"{file.stem}:{index}")
        try:
            if "__error__" in row:
                raise ValueError(row["__error__"])
            entry = mapping(row, file)
            key = entry["id"]
            result.samples.append(to_sample(entry, rules, file.parent))
        except (ValueError, KeyError, SyntaxError, TypeError) as exc:
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            bad = BadSample(id=str(key), reason=reason, source=str(file))
            logger.warning("%s: skipping bad row %s: %s", name, bad.id, bad.reason)
            result.bad.append(bad)
        if limit is not None and len(result.samples) >= limit:
            break
    if not result.samples:
        raise DataError(f"{name}: no usable rows in {path} ({len(result.bad)} bad)")
    if result.bad_fraction > max_bad_fraction:
        raise DataError(f"{name}: {len(result.bad)} of {result.total} rows are bad; first: "
                        + "; ".join(f"{b.id}: {b.reason}" for b in result.bad[:5]))
    return result

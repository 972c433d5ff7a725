"""Read JSONL and Parquet datasets into validated :class:`Sample` objects.

Column layouts understood (the common VLM-RL ones): question in ``question`` |
``problem`` | ``query`` | ``prompt``; answer in ``answer`` | ``ground_truth`` |
``solution``; images in ``images`` (list) | ``image`` (one), each a path, bytes, base64 /
data URI or a ``{"bytes", "path"}`` dict; optional ``id``, ``reasoning`` | ``response``,
``family``; a one-turn chat ``messages`` list (user, assistant) gives an SFT row its own
prompt (``meta["prompt"]``) and reference reply. ``<image>`` placeholders in the question
are removed: the chat template places the image tokens.

Every row is validated as it is read. A bad row (missing or corrupt image, empty
question, missing answer) becomes a :class:`BadSample` with its id and reason, is logged
and skipped. Only when the share of bad rows passes ``max_bad_fraction`` does reading fail,
with a :class:`DataError` that lists the first offenders.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_ivr.data.images import MAX_SOURCE_PIXELS, ImageError, decode_image, regular_file, resize_for_qwen
from megatron_ivr.data.sample import BadSample, Sample

logger = logging.getLogger(__name__)

QUESTION_KEYS = ("question", "problem", "query", "prompt")
ANSWER_KEYS = ("answer", "ground_truth", "solution")
REASONING_KEYS = ("reasoning", "response")


class DataError(ValueError):
    """A dataset cannot be used as a whole (unreadable file, too many bad samples)."""


@dataclass
class ImageRules:
    """Qwen resizing parameters applied to every image read."""

    factor: int = 28
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 448 * 448
    max_source_pixels: int = MAX_SOURCE_PIXELS  # checked from the header, before decoding


@dataclass
class LoadedDataset:
    samples: list[Sample]
    bad: list[BadSample] = field(default_factory=list)
    path: str = ""

    @property
    def total(self) -> int:
        return len(self.samples) + len(self.bad)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def metrics(self, prefix: str = "data") -> dict:
        return {f"{prefix}/samples": len(self.samples), f"{prefix}/bad_samples": len(self.bad),
                f"{prefix}/bad_fraction": self.bad_fraction}


def _first(row: dict, keys: tuple) -> Any:
    for key in keys:
        if key in row and row[key] is not None:
            return row[key]
    return None


def iter_rows(path: Path) -> Iterator[dict]:
    """Yield raw rows of a ``.jsonl`` or ``.parquet`` file. A JSONL line that does not
    parse is yielded as ``{"__error__": ...}`` so it is reported like any bad sample."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield {"id": f"{path.name}:{line_no}", "__error__": f"invalid UTF-8: {exc}",
                           "__row__": line_no - 1}
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError("line is not a JSON object")
                except ValueError as exc:
                    row = {"id": f"{path.name}:{line_no}", "__error__": f"invalid JSON: {exc}"}
                except RecursionError:
                    row = {"id": f"{path.name}:{line_no}", "__error__": "invalid JSON: nested too deeply"}
                row.setdefault("__row__", line_no - 1)
                yield row
    elif suffix == ".parquet":
        index = 0
        for batch in parquet_batches(path, 256):
            for row in batch.to_pylist():
                row.setdefault("__row__", index)
                index += 1
                yield row
    else:
        raise DataError(f"{path}: unsupported dataset format {suffix!r} (use .jsonl or .parquet)")


def answer_pairs(path: str | Path) -> Iterator[tuple[Optional[str], str]]:
    """``(family, gold answer)`` of every readable row of a dataset file, without decoding
    any image (the training answer distribution of the blind-guesser baseline)."""
    for row in iter_rows(Path(path)):
        answer = None if "__error__" in row else _first(row, ANSWER_KEYS)
        if answer is not None and str(answer).strip():
            yield row.get("family"), str(answer).strip()


def parquet_batches(path: Path, batch_size: int):
    """Record batches of a Parquet file; a corrupt file is a :class:`DataError` naming it and
    the row where reading stopped (Parquet has no per-row framing to skip a bad row by)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            rows += batch.num_rows
            yield batch
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file (after {rows} rows): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "image"}, {"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _chat_pair(messages) -> tuple[Optional[str], Optional[str]]:
    """(user text, assistant text) of a one-turn ``messages`` list; (None, None) otherwise."""
    if not isinstance(messages, list):
        return None, None
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    reply = [m for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
    if len(user) != 1 or len(reply) != 1:
        return None, None
    prompt = _text(user[0].get("content")).replace("<image>", "").strip()
    answer = _text(reply[0].get("content")).strip()
    return (prompt, answer) if prompt and answer else (None, None)


def row_to_sample(row: dict, rules: ImageRules, root: Optional[Path], default_id: str,
                  allow_outside_root: bool = False) -> Sample:
    """Validate one row and build its sample; raise ``ValueError`` naming the problem."""
    if "__error__" in row:
        raise ValueError(row["__error__"])
    question = _first(row, QUESTION_KEYS)
    if not isinstance(question, str) or not question.replace("<image>", "").strip():
        raise ValueError("empty or missing question")
    answer = _first(row, ANSWER_KEYS)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError("empty or missing answer")
    raw_images = row.get("images", row.get("image"))
    if raw_images is None:
        raw_images = []
    elif not isinstance(raw_images, list):
        raw_images = [raw_images]
    images = []
    for k, raw in enumerate(raw_images):
        try:
            image = decode_image(raw, root, allow_outside_root, rules.max_source_pixels)
        except ImageError as exc:
            raise ValueError(f"image {k}: {exc}") from None
        images.append(resize_for_qwen(image, rules.factor, rules.min_pixels, rules.max_pixels))
    reasoning = _first(row, REASONING_KEYS)
    meta = {k: v for k, v in row.items() if k in ("choices", "split", "scene")}
    prompt, reply = _chat_pair(row.get("messages"))
    if reply is not None:  # a chat-format SFT row: its own prompt and reference reply
        meta["prompt"], reasoning = prompt, reply
    return Sample(
        id=str(row.get("id", default_id)),
        images=images,
        question=question.replace("<image>", "").strip(),
        answer=str(answer).strip(),
        reasoning=reasoning if isinstance(reasoning, str) else None,
        family=row.get("family"),
        meta=meta,
    )


def read_dataset(path: str | Path, rules: ImageRules | None = None, max_bad_fraction: float = 0.05,
                 image_root: str | Path | None = None, limit: int | None = None,
                 allow_outside_root: bool = False, check: Optional[Callable[[Sample], Optional[str]]] = None
                 ) -> LoadedDataset:
    """Read and validate a dataset file; see the module docstring for the rules. ``check``: a
    further rule of the caller's (``sample -> reason or None``; the trainer's prompt length)."""
    path = Path(path)
    try:
        regular_file(path, "dataset file")
    except OSError as exc:
        raise DataError(f"{exc.strerror}: {path}") from None
    rules = rules or ImageRules()
    root = Path(image_root) if image_root else path.parent
    result = LoadedDataset(samples=[], path=str(path))
    for row in iter_rows(path):
        default_id = f"{path.stem}:{row.get('__row__')}"
        try:
            sample = row_to_sample(row, rules, root, default_id, allow_outside_root)
            reason = check(sample) if check is not None else None
            if reason is not None:
                raise ValueError(reason)
            result.samples.append(sample)
        except ValueError as exc:
            bad = BadSample(id=str(row.get("id", default_id)), reason=str(exc), source=str(path))
            logger.warning("skipping bad sample %s in %s: %s", bad.id, path, bad.reason)
            result.bad.append(bad)
        if limit is not None and len(result.samples) >= limit:
            break
    if result.total == 0:
        raise DataError(f"{path}: no samples")
    if result.bad_fraction > max_bad_fraction:
        listing = "; ".join(f"{b.id}: {b.reason}" for b in result.bad[:5])
        raise DataError(
            f"{path}: {len(result.bad)} of {result.total} samples are bad "
            f"({result.bad_fraction:.1%} > data.max_bad_fraction={max_bad_fraction:.1%}); first: {listing}"
        )
    return result

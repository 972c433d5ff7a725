"""Bad input files get one clear error or become bad rows, never a hang, a traceback or a
gigabyte decode: FIFOs, images that declare huge sizes, deep JSON, corrupt Parquet, bad
UTF-8, and benchmark files whose grading column was renamed."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_ivr.data import DataError, read_dataset
from megatron_ivr.data.benchmarks import read_benchmark
from megatron_ivr.data.images import ImageError, decode_image


def _png(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is tiny (it would decode to
    width * height * 3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    with pytest.raises(ImageError, match="not a regular file"):
        decode_image(str(fifo))
    data = tmp_path / "data.jsonl"
    os.mkfifo(data)
    with pytest.raises(DataError, match="not a regular file"):
        read_dataset(data)
    with pytest.raises(DataError, match="not a regular file"):
        read_benchmark("mathvision", data)


def test_pixel_cap_is_checked_from_the_header_before_decoding():
    bomb = _huge_png_header(13000, 13000)  # 169 Mpixel declared in a few hundred bytes
    assert len(bomb) < 1000
    with pytest.raises(ImageError, match="13000 x 13000 pixels is over the limit"):
        decode_image(bomb)
    with pytest.raises(ImageError, match="over the limit of 3000"):
        decode_image(_png((64, 48)), max_source_pixels=3000)
    assert decode_image(_png((64, 48))).size == (64, 48)


def test_deep_json_and_bad_utf8_lines_are_bad_rows(tmp_path):
    good = {"id": "ok", "question": "q?", "answer": "1"}
    lines = [json.dumps(good).encode(), b"[" * 100_000 + b"]" * 100_000,
             b'{"id": "u", "question": "\xff", "answer": "1"}']
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    dataset = read_dataset(path, max_bad_fraction=1.0)
    assert [s.id for s in dataset.samples] == ["ok"]
    reasons = sorted(b.reason for b in dataset.bad)
    assert len(reasons) == 2 and "invalid UTF-8" in reasons[1] and "invalid JSON" in reasons[0]


def test_corrupt_parquet_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "1"}] * 10), path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 16] = b"\x00" * 16
    raw[-12:-8] = b"\xff\xff\xff\x7f"  # the footer's length: nonsense
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        read_dataset(path)
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        read_benchmark("dynamath", path)


def test_a_bad_utf8_byte_in_a_benchmark_file_costs_one_row(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(_png())
    row = {"id": "1", "question": "Area?", "options": [], "image": "images/1.png", "answer": "12", "subject": "a"}
    text = json.dumps(row).encode() + b"\n" + json.dumps(dict(row, id="2")).encode().replace(b"Area", b"Ar\xffa")
    (tmp_path / "test.jsonl").write_bytes(text + b"\n")
    dataset = read_benchmark("mathvision", tmp_path / "test.jsonl")
    assert [s.id for s in dataset.samples] == ["1"]
    assert [b.reason for b in dataset.bad] == ["line is not valid UTF-8"]


@pytest.mark.parametrize("renamed", ["question_type", "precision"])
def test_a_renamed_grading_column_refuses_the_file(tmp_path, renamed):
    row = {"pid": "1", "question": "Which?", "choices": ["30", "60"], "answer": "60", "question_type": "multi_choice",
           "answer_type": "text", "precision": None, "metadata": {"task": "t"},
           "decoded_image": {"bytes": _png(), "path": "1.jpg"}}
    row[renamed + "_v2"] = row.pop(renamed)
    path = tmp_path / "testmini.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(DataError, match=f"no column '{renamed}', which the mathvista layout grades by"):
        read_benchmark("mathvista", path)

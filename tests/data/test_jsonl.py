"""The JSONL files our commands write for one another: strict reads, atomic writes."""

from __future__ import annotations

import pytest

from megatron_ivr.data.jsonl import read_jsonl, write_jsonl


def test_round_trip_and_atomic_write(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("old\n")
    write_jsonl(path, ({"id": str(k), "x": [k, "é"]} for k in range(3)))
    assert read_jsonl(path) == [{"id": "0", "x": [0, "é"]}, {"id": "1", "x": [1, "é"]}, {"id": "2", "x": [2, "é"]}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_bad_line_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": \n')
    with pytest.raises(ValueError, match=r"rows.jsonl:3: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: a line is not a JSON object"):
        read_jsonl(path)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"id": "kept"}])

    def rows():
        yield {"id": "new"}
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError):
        write_jsonl(path, rows())
    assert read_jsonl(path) == [{"id": "kept"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]

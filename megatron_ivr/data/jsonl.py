"""Plain JSONL files that the tools write for one another (generated splits, RFT rows, weighted
prompt pools): read strictly, written atomically.

Datasets a user brings are read by :mod:`megatron_ivr.data.readers`, which reports and skips a
bad row; the files here are made by our own commands, so a line that does not parse is an error
that names the file and the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | Path) -> list[dict]:
    """Every non-empty line of ``path`` as a dict; a line that is not a JSON object raises
    ``ValueError`` naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: a line is not a JSON object")
            rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` one per line to ``path`` through a ``.tmp`` sibling renamed into place, so
    that a reader never sees half a file and a failure leaves the old file whole (and no ``.tmp``
    behind when it is an exception)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)

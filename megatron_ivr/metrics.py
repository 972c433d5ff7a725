"""Run metrics: one JSON line per record (always), TensorBoard scalars (optional)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional


class MetricsWriter:
    def __init__(self, log_dir: str | Path, tensorboard: bool = False, filename: str = "metrics.jsonl"):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / filename
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        record = {"time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step or 0)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]

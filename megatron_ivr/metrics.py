"""Run metrics: one JSON line per record (always), TensorBoard scalars and Weights & Biases
(optional; W&B only when the package is installed and asked for)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from megatron_ivr.config.loader import config_to_dict
from megatron_ivr.config.schema import RunConfig


class MetricsWriter:
    def __init__(self, log_dir: str | Path, tensorboard: bool = False, filename: str = "metrics.jsonl",
                 wandb_project: Optional[str] = None, run_name: Optional[str] = None, config: Optional[dict] = None):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / filename
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.log_dir / "tensorboard"))
        self._wandb = None
        if wandb_project is not None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb=true but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config, dir=str(self.log_dir))

    def log(self, metrics: dict, step: Optional[int] = None) -> None:
        record = {"time": time.time(), **({"step": step} if step is not None else {}), **metrics}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step or 0)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_writer(cfg: RunConfig, log_dir: str, rank: int) -> Optional[MetricsWriter]:
    """The run's writer on rank 0 (``logging.*``; the resolved config goes to W&B); None elsewhere."""
    if rank != 0:
        return None
    return MetricsWriter(log_dir, cfg.logging.tensorboard, wandb_project=cfg.logging.wandb_project
                         if cfg.logging.wandb else None, run_name=cfg.name, config=config_to_dict(cfg))

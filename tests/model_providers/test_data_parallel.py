"""Data parallelism with megatron's DDP and distributed optimizer: DP=2 (and TP2 x DP2) with
one micro-batch per rank takes the same step as one process with both micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ivr.model_providers.parallel import free_port

WORKER = Path(__file__).with_name("dp_worker.py")


def run(out: Path, nproc: int, tp: int, model_dir: Path) -> dict:
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(WORKER), str(out), str(tp), str(model_dir)]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((out / "results.json").read_text())


def test_data_parallel_step_matches_single_process(tiny_models, tmp_path):
    model_dir = tiny_models["qwen3_vl"]
    single = run(tmp_path / "single", 1, 1, model_dir)
    dp2 = run(tmp_path / "dp2", 2, 1, model_dir)
    tp2_dp2 = run(tmp_path / "tp2dp2", 4, 2, model_dir)
    assert single["updated"] and dp2["updated"] and tp2_dp2["updated"]
    for other in (dp2, tp2_dp2):
        assert other["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
        # every DP rank holds the same updated model, equal to the single-process one
        assert max(other["checksums"]) - min(other["checksums"]) <= 1e-9 * single["checksums"][0]
        assert other["checksums"][0] == pytest.approx(single["checksums"][0], rel=1e-9)

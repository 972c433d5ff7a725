"""Helpers for the end-to-end trainer tests: a run config over the session's tiny model and
synthetic data, and the `megatron-ivr` command alone or under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ivr.metrics import read_metrics
from megatron_ivr.model_providers.parallel import free_port

# A random tiny model never writes a correct boxed answer, so every reward would be 0 and
# every advantage 0. DAPO's overlong shaping makes rewards depend on length, and IVR-R1
# with tau = -0.5 treats strongly penalized responses as eroded and accepts rewrites scored
# (without the length penalty) at 0: every loss path (clipped, shaped, TIS) then carries weight.
# A sampling temperature other than 1 checks that engine and trainer score the same tempered
# distribution.
RL_OVERRIDES = [
    "trainer.steps=3", "trainer.prompts_per_step=4", "trainer.lr=1e-3", "trainer.max_tokens_per_micro_batch=400",
    "rollout.n=4", "rollout.max_new_tokens=24", "rollout.temperature=0.8", "algorithm.overlong_shaping=true",
    "algorithm.overlong_cache=16",
    "algorithm.vicra.enabled=true", "algorithm.ivr.enabled=true", "algorithm.ivr.tau=-0.5",
    "algorithm.ivr.critique_max_new_tokens=12", "algorithm.ivr.max_rounds=1", "checkpoint.save_interval=0",
    "logging.progress=false",
]


def write_config(run_dir: Path, model_dir: Path, data_dir: Path) -> Path:
    config = {
        "name": "test",
        "data": {"train_path": str(data_dir / "train.jsonl"), "val_path": str(data_dir / "val.jsonl"),
                 "test_path": str(data_dir / "test.jsonl"), "min_pixels": 3136, "max_pixels": 12544},
        "model": {"path": str(model_dir)},
        "sft": {"init_path": str(model_dir), "data_paths": [str(data_dir / "sft.jsonl")],
                "output_dir": str(run_dir / "sft"), "steps": 4, "batch_size": 8, "lr": 1e-3,
                "lr_warmup_steps": 2},
        "trainer": {"device": "cpu", "export_dir": str(run_dir / "export")},
        "checkpoint": {"dir": str(run_dir / "checkpoints")},
        "logging": {"dir": str(run_dir / "logs")},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(subcommand: str, config: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "megatron_ivr.cli", subcommand, str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "megatron_ivr.cli", subcommand, str(config), *overrides]


def clean_env() -> dict:
    """This process's environment without the rendezvous variables that an in-process test's
    ``init_parallel`` left behind (a child would try to listen on the same port)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1")


def run(subcommand: str, config: Path, overrides: list[str], nproc: int = 1, timeout: int = 400):
    result = subprocess.run(command(subcommand, config, overrides, nproc), env=clean_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    return result


def step_records(log_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run may log a step twice)."""
    return {int(r["step"]): r for r in read_metrics(log_dir / "metrics.jsonl") if "step" in r}


def assert_same_step(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """One logged RL step trained as another: the same prompts, the loss within ``tol`` and the
    gradient norm within ``tol`` relative (another layout: 1e-5; a resumed run: 1e-6)."""
    assert got["samples"] == expected["samples"]
    assert got["loss/total"] == pytest.approx(expected["loss/total"], abs=tol)
    assert got["optim/grad_norm"] == pytest.approx(expected["optim/grad_norm"], rel=tol)


def wait_for(predicate, process, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended early: {process.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def logged_steps(log_dir) -> set:
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return set()
    return {json.loads(line)["step"] for line in path.read_text().splitlines() if '"step"' in line}


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (which it starts in their own process groups)."""
    import psutil

    parent = psutil.Process(pid)
    processes = parent.children(recursive=True) + [parent]
    for proc in processes:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def kill_after_step(config: Path, overrides: list[str], log_dir: Path, step: int, nproc: int = 1) -> None:
    """Start ``megatron-ivr train``, SIGKILL it (every process) as soon as ``step`` is logged
    (after that step's checkpoint: the next step is under way), and check that no later step
    was logged."""
    process = subprocess.Popen(command("train", config, overrides, nproc), env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: step in logged_steps(log_dir), process, 300)
        kill_tree(process.pid)
    finally:
        process.wait()
    assert step + 1 not in logged_steps(log_dir)

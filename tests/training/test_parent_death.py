"""Ranks and helper processes end with their parent (model_providers/lifetime.py): SIGKILL the
torchrun agent mid-run, or the converter while its spawned ranks work, and every process they
started (ranks, megatron-core's checkpoint-writer manager) is gone within seconds, having
written no FINISHED marker and no export."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from tests.training.runs import RL_OVERRIDES, clean_env, command, write_config


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_parent_and_check_descendants(parent: subprocess.Popen, descendants: list[psutil.Process]) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    gone, alive = psutil.wait_procs(descendants, timeout=15)
    for process in alive:  # clean up before failing
        process.kill()
    assert not alive, [p.pid for p in alive]


def test_ranks_and_the_writer_manager_end_with_a_killed_torchrun(tiny_models, synthetic_dir, tmp_path):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = [o for o in RL_OVERRIDES if not o.startswith(("trainer.steps", "checkpoint.save_interval"))]
    argv = command("train", config, [*overrides, "trainer.steps=200", "checkpoint.save_interval=1"], nproc=2)
    agent = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        checkpoints = tmp_path / "checkpoints"
        _wait_for(lambda: any(checkpoints.glob("step_*/COMPLETE")), 400, "the first checkpoint")
        descendants = psutil.Process(agent.pid).children(recursive=True)
        ranks = [p for p in descendants if "megatron_ivr.cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2 and len(descendants) > 2, [p.cmdline()[:3] for p in descendants]  # + the managers
        _kill_parent_and_check_descendants(agent, descendants)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert not (checkpoints / "FINISHED").exists() and not (tmp_path / "export").exists()


def test_converter_ranks_end_with_their_parent(tiny_models, tmp_path):
    argv = [sys.executable, "-m", "megatron_ivr.cli", "convert", "hf-to-megatron", str(tiny_models["qwen2_5_vl"]),
            str(tmp_path / "out"), "--tp", "2"]
    parent = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ranks = _wait_for(lambda: len(psutil.Process(parent.pid).children()) >= 2 and
                          psutil.Process(parent.pid).children(), 60, "the converter's two ranks")
        _kill_parent_and_check_descendants(parent, ranks)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not (tmp_path / "out").exists()

"""The node scripts of launch/scripts.py: what they start, with which flags, and that they
really run: the colocated script trains on this CPU under torchrun, and a SIGTERM sent to
every process (what Slurm does before the time limit) ends in a saved checkpoint and the
requeue exit status; the requeued script resumes and finishes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_ivr.config import load_config
from megatron_ivr.config.loader import apply_override
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.launch.scripts import REQUEUE_EXIT, render_node_script
from megatron_ivr.rollout.sglang.server import SERVER_BOOTSTRAP
from tests.training.runs import RL_OVERRIDES, clean_env, step_records, write_config


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, ["model.path=/models/qwen", "checkpoint.dir=/ckpt", *overrides])


def _heredoc(script: str) -> dict:
    body = script.split("<<'MEGATRON_IVR_RUN_CONFIG'\n", 1)[1].split("\nMEGATRON_IVR_RUN_CONFIG\n", 1)[0]
    return yaml.safe_load(body)


def _trainer_line(script: str) -> str:
    return next(line for line in script.splitlines() if "-m megatron_ivr.cli" in line)


def test_colocated_script_starts_servers_then_torchrun_with_offload():
    cfg = _cfg("launch.gpus_per_node=8", "launch.servers_per_node=2", "launch.server_mem_fraction=0.4",
               "parallel.tensor_parallel=2", "rollout.backend=sglang")
    script = render_node_script(cfg, "colocated", "cuda")
    servers = [line for line in script.splitlines() if "sglang.launch_server" in line]
    assert len(servers) == 2
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3 " in servers[0] and "CUDA_VISIBLE_DEVICES=4,5,6,7 " in servers[1]
    for port, line in zip((30000, 30001), servers):
        assert f"--port {port}" in line and "--tp-size 4" in line and "--enable-memory-saver" in line
        assert "--mem-fraction-static 0.4" in line and "SGLANG_VLM_CACHE_SIZE_MB=0" in line
        assert "--model-path /models/qwen" in line and "--host 127.0.0.1" in line
    assert script.index("sglang.launch_server") < script.index("megatron_ivr.rollout.sglang.wait")
    assert script.index("megatron_ivr.rollout.sglang.wait") < script.index("torch.distributed.run")
    torchrun = next(line for line in script.splitlines() if "torch.distributed.run" in line)
    assert "--nproc-per-node 8" in torchrun and "--nnodes 1" in torchrun and "--master-port 29500" in torchrun
    trainer = _trainer_line(script)
    for override in ("rollout.backend=sglang", "rollout.offload_during_train=true", "rollout.weight_transport=tensor",
                     "rollout.server_tp_size=4", "rollout.sync_master_address=$MASTER_ADDR"):
        assert f'"{override}"' in trainer
    # SIGTERM is left to the trainer ranks: neither the script nor torchrun acts on it
    assert "trap '' TERM" in script
    assert "PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT" in script
    assert f"status={REQUEUE_EXIT}" in script and "/ckpt/FINISHED" in script
    # the resolved config travels inside the script, complete
    assert _heredoc(script) == yaml.safe_load(__import__("megatron_ivr.config", fromlist=["dump_config"])
                                              .dump_config(cfg))


def test_multi_node_colocated_uses_the_distributed_transport():
    cfg = _cfg("launch.nodes=2", "rollout.backend=sglang")
    assert '"rollout.weight_transport=distributed"' in _trainer_line(render_node_script(cfg, "colocated"))


def test_disaggregated_roles_split_servers_and_trainer():
    cfg = _cfg("launch.placement=disaggregated", "launch.rollout_nodes=2", "launch.nodes=3",
               "launch.server_host=0.0.0.0", "rollout.api_key=k3y")
    rollout = render_node_script(cfg, "rollout")
    trainer = render_node_script(cfg, "trainer")
    assert "sglang.launch_server" in rollout and "torch.distributed.run" not in rollout
    assert "wait -n" in rollout and "--enable-memory-saver" not in rollout  # it keeps its GPUs
    assert shlex.quote(SERVER_BOOTSTRAP) in rollout and "--host 0.0.0.0" in rollout  # the key: environment only
    assert not any("k3y" in line for line in rollout.splitlines() if "setsid" in line)
    assert "sglang.launch_server" not in trainer and "--nnodes 3" in trainer
    line = _trainer_line(trainer)
    assert '"rollout.weight_transport=distributed"' in line and "offload_during_train" not in line


def test_server_urls_block_gives_a_list_the_config_accepts():
    """Run the URL part of a rendered script in bash with two rollout hosts and feed the
    result through the real override parser."""
    cfg = _cfg("launch.servers_per_node=2", "rollout.backend=sglang")
    script = render_node_script(cfg, "trainer")
    start = script.index("urls=()")
    block = script[start:script.index("megatron_ivr.rollout.sglang.wait")].rsplit("\n", 1)[0]
    out = subprocess.run(["bash", "-c", block + '\necho "$IVR_SERVER_URLS"\necho "$plain_urls"'],
                         env=dict(os.environ, IVR_ROLLOUT_HOSTS="node-a node-b"), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    tree = {}
    apply_override(tree, f"rollout.server_urls={out[0]}", {})
    assert tree["rollout"]["server_urls"] == ["http://node-a:30000", "http://node-a:30001", "http://node-b:30000",
                                              "http://node-b:30001"]
    assert out[1].split() == tree["rollout"]["server_urls"]


@pytest.fixture()
def colocated_cpu_script(tmp_path, tiny_models, synthetic_dir):
    """The colocated node script for this CPU: local engine, 2 trainer processes at TP2."""
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = [o for o in RL_OVERRIDES if not o.startswith("trainer.steps")]
    cfg = load_config(config, [*overrides, "trainer.steps=3", "parallel.tensor_parallel=2", "launch.gpus_per_node=2",
                               f"launch.master_port={29700 + os.getpid() % 200}", "checkpoint.save_interval=1"])
    path = tmp_path / "node.sh"
    path.write_text(render_node_script(cfg, "colocated", "cpu", python=sys.executable))
    return path, tmp_path


def _signal_tree(pid: int, sig: int) -> None:
    """What Slurm does before the time limit: signal every process of the step (torchrun's
    workers sit in their own sessions, so a process-group kill would miss them)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def _start(script, cwd):
    env = dict(clean_env(), IVR_LOG_DIR=str(cwd / "node_logs"))
    return subprocess.Popen(["bash", str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_colocated_script_trains_and_a_sigterm_requeues_then_resumes(colocated_cpu_script):
    script, run_dir = colocated_cpu_script
    process = _start(script, run_dir)
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and step_records(run_dir / "logs"):
            break
        time.sleep(0.5)
    assert process.poll() is None, process.stdout.read()[-4000:]
    _signal_tree(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == REQUEUE_EXIT, output[-4000:]
    assert "stopped before its last step" in output
    stopped_at = max(step_records(run_dir / "logs"))
    assert stopped_at < 3
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").exists()
    assert not (run_dir / "checkpoints" / "FINISHED").exists()

    process = _start(script, run_dir)  # the requeued job
    output = process.communicate(timeout=400)[0]
    assert process.returncode == 0, output[-4000:]
    assert "resumed from" in output
    assert sorted(step_records(run_dir / "logs")) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "FINISHED").exists()


def test_server_specs_bind_as_configured_and_carry_the_key():
    from megatron_ivr.launch.scripts import server_specs

    default = server_specs(_cfg(), "cpu")[0]
    assert default.host == "127.0.0.1" and default.api_key is None  # loopback unless configured
    spec = server_specs(_cfg("launch.server_host=0.0.0.0", "rollout.api_key=k3y"), "cpu")[0]
    assert spec.host == "0.0.0.0" and spec.api_key == "k3y" and "k3y" not in " ".join(spec.command())
    assert spec.environment()["MEGATRON_IVR_API_KEY"] == "k3y"

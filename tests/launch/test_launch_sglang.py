"""Integration tier: the colocated node script on this CPU with a real SGLang 0.5.23 server.
The script starts the server, waits until it generates, runs the trainer under torchrun
against it (two RL steps, `tensor` weight push, the servers asked to release and resume
their memory around each training phase: no-ops on CPU, real HTTP calls), and exits 0 with
the run marked finished; the server is gone afterwards."""

from __future__ import annotations

import subprocess
import sys

from megatron_ivr.config import load_config
from megatron_ivr.launch.scripts import render_node_script
from megatron_ivr.model_providers.parallel import free_port
from megatron_ivr.rollout.sglang.server import free_server_port, probe
from tests.sglang_tier import MARKS, PYTHON
from tests.training.runs import RL_OVERRIDES, clean_env, step_records, write_config

pytestmark = MARKS


def test_colocated_node_script_with_a_real_sglang_server(tiny_models, synthetic_dir, tmp_path):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    port = free_server_port()
    overrides = [o for o in RL_OVERRIDES if not o.startswith("trainer.steps")]
    cfg = load_config(config, [*overrides, "trainer.steps=2", "rollout.backend=sglang",
                               "rollout.offload_during_train=true", "launch.gpus_per_node=1",
                               f"launch.server_port={port}", f"launch.master_port={free_port()}",
                               f"launch.sglang_python={PYTHON}"])
    script = tmp_path / "node.sh"
    script.write_text(render_node_script(cfg, "colocated", "cpu", python=sys.executable))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=dict(clean_env(), IVR_LOG_DIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:],
                                    (tmp_path / "sglang_node0_0.log").read_text()[-3000:])
    assert "1 SGLang server(s) ready" in result.stdout
    steps = step_records(tmp_path / "logs")
    assert sorted(steps) == [1, 2]
    assert steps[2]["rollout/weight_version_min"] == 1  # generated after the first push
    for record in steps.values():
        assert record["mismatch/abs_logp_diff_max"] <= 1e-4
    assert (tmp_path / "checkpoints" / "FINISHED").exists()
    assert not probe(f"http://127.0.0.1:{port}/health")  # the script took its server down


def test_launch_local_starts_the_servers_it_needs(tiny_models, synthetic_dir, tmp_path):
    """`launch local` with rollout.backend=sglang and no server URLs: the launcher starts a
    server (the server manager), the trainer runs two steps against it through nemo-run,
    and the server is stopped afterwards."""
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    port = free_server_port()
    overrides = [o for o in RL_OVERRIDES if not o.startswith("trainer.steps")]
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ivr.cli", "launch", "local", str(config), *overrides, "trainer.steps=2",
         "rollout.backend=sglang", "launch.gpus_per_node=1", f"launch.server_port={port}",
         f"launch.job_dir={tmp_path / 'launches'}"],
        env=dict(clean_env(), SGLANG_PYTHON=PYTHON), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=1200)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "starting 1 SGLang server(s)" in result.stdout
    steps = step_records(tmp_path / "logs")
    assert sorted(steps) == [1, 2] and steps[2]["rollout/weight_version_min"] == 1
    assert not probe(f"http://127.0.0.1:{port}/health")

"""`megatron-ivr launch`: Slurm dry runs rendered by nemo-run (both placements), the Docker
dry run, the sizing checks, and a real `launch local` of two trainer processes (TP2, gloo)
through nemo-run's LocalExecutor with torchrun on this CPU."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("nemo_run")

from megatron_ivr.config import ConfigError, load_config  # noqa: E402
from megatron_ivr.launch.launcher import launch  # noqa: E402
from megatron_ivr.rollout.sglang.server import SERVER_BOOTSTRAP  # noqa: E402
from tests.training.runs import RL_OVERRIDES, clean_env, step_records, write_config  # noqa: E402

SLURM = ["launch.account=rl_team", "launch.partition=batch", "launch.time=02:00:00",
         "launch.container_image=nvcr.io/acme/megatron-ivr:0.1", "launch.container_mounts=[/lustre:/lustre]",
         "launch.env.NCCL_DEBUG=WARN", "model.path=/lustre/models/qwen", "checkpoint.dir=/lustre/run/ckpt"]


def _dryrun(tmp_path: Path, *overrides: str, mode: str = "slurm") -> Path:
    """The CLI as a user types it (stdin closed: nemo-run's local tunnel reads it)."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"launch": {"job_dir": str(tmp_path / "jobs")}}))
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "launch", mode, str(config), *SLURM,
                             *overrides, "--dryrun"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            env=clean_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run" in result.stdout
    return tmp_path / "jobs"


def _sbatch(folder: Path) -> str:
    (path,) = folder.rglob("*_sbatch.sh")
    return path.read_text()


def _scripts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.rglob("scripts/*.sh")}


def _flags(sbatch: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in sbatch.splitlines() if line.startswith("#SBATCH")]


def test_slurm_colocated_dryrun(tmp_path):
    folder = _dryrun(tmp_path, "launch.nodes=2", "launch.gpus_per_node=8", "launch.server_host=0.0.0.0",
                     "parallel.tensor_parallel=4", "launch.preempt_signal_s=240", "launch.max_requeues=3")
    sbatch = _sbatch(folder)
    flags = _flags(sbatch)
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--account=rl_team", "--partition=batch",
                 "--time=02:00:00", "--signal=TERM@240", "--requeue", "--exclusive"):
        assert flag in flags, flag
    assert "hetjob" not in flags
    assert "export TORCHX_MAX_RETRIES=3" in sbatch  # the requeue budget the sbatch checks
    # the trainer rendezvous at the first node; the servers of every node are the rollout hosts
    assert "export MASTER_ADDR=$head_node_ip" in sbatch and 'export IVR_ROLLOUT_HOSTS="${nodes[*]}"' in sbatch
    assert "export NCCL_DEBUG=WARN" in sbatch
    (srun,) = [line for line in sbatch.splitlines() if line.startswith("srun")]
    assert "--container-image nvcr.io/acme/megatron-ivr:0.1" in srun and "/lustre:/lustre" in srun
    (script,) = _scripts(folder).values()
    assert "role colocated" in script  # every node starts its own server and its own torchrun
    assert "sglang.launch_server" in script and "--enable-memory-saver" in script and "--tp-size 8" in script
    assert "--nnodes 2" in script and "--nproc-per-node 8" in script
    assert '"rollout.weight_transport=distributed"' in script  # IPC handles do not cross nodes
    assert '"rollout.offload_during_train=true"' in script
    assert (next(folder.rglob("run_config.yaml"))).exists()


def test_slurm_disaggregated_dryrun_is_a_het_job(tmp_path):
    folder = _dryrun(tmp_path, "launch.placement=disaggregated", "launch.rollout_nodes=1", "launch.nodes=2",
                     "launch.servers_per_node=2", "launch.server_host=0.0.0.0", "rollout.api_key=secret")
    sbatch = _sbatch(folder)
    flags = _flags(sbatch)
    assert flags.count("hetjob") == 1
    first, second = "\n".join(flags).split("hetjob")
    assert "--nodes=1" in first and "--nodes=2" in second
    assert first.count("--gpus-per-node=8") == 1 and second.count("--gpus-per-node=8") == 1
    sruns = [line for line in sbatch.splitlines() if line.startswith("srun")]
    assert len(sruns) == 2 and "--het-group=0" in sruns[0] and "--het-group=1" in sruns[1]
    assert all("--container-image nvcr.io/acme/megatron-ivr:0.1" in s for s in sruns)
    # the trainer finds its head node and every rollout host through the het-group variables
    assert "export MASTER_ADDR=$het_group_host_1" in sbatch
    assert "SLURM_JOB_NODELIST_HET_GROUP_0" in re.search(r"export IVR_ROLLOUT_HOSTS=.*", sbatch).group(0)
    scripts = _scripts(folder)
    rollout = next(s for s in scripts.values() if "role rollout" in s)
    trainer = next(s for s in scripts.values() if "role trainer" in s)
    # each group starts its own processes (nemo-run would use the first group's launcher for both)
    assert rollout.count("setsid ") == 2 and "torch.distributed.run" not in rollout
    assert "SGLANG_VLM_CACHE_SIZE_MB=0" in rollout and "--tp-size 4" in rollout
    # the key reaches the servers through the environment (the bootstrap), never their argv
    assert rollout.count(shlex.quote(SERVER_BOOTSTRAP)) == 2 and "export MEGATRON_IVR_API_KEY=secret" in rollout
    assert not any("secret" in line for line in rollout.splitlines() if "setsid" in line)
    assert "torch.distributed.run" in trainer and "--nnodes 2" in trainer and "sglang.launch_server" not in trainer
    assert '"rollout.weight_transport=distributed"' in trainer and '"rollout.server_tp_size=4"' in trainer
    assert "offload_during_train=true" not in next(line for line in trainer.splitlines() if "megatron_ivr.cli" in line)


def test_sft_launch_starts_no_servers(tmp_path):
    folder = _dryrun(tmp_path, "launch.placement=disaggregated", "launch.rollout_nodes=1", "launch.nodes=2",
                     "launch.server_host=0.0.0.0", "--run", "sft")
    assert "hetjob" not in _flags(_sbatch(folder)) and "--nodes=2" in _flags(_sbatch(folder))
    (script,) = _scripts(folder).values()
    assert "sglang.launch_server" not in script and "-m megatron_ivr.cli sft" in script
    assert "rollout.server_urls" not in next(line for line in script.splitlines() if "megatron_ivr.cli" in line)


def test_docker_dryrun(tmp_path):
    folder = _dryrun(tmp_path, "launch.gpus_per_node=4", mode="docker")
    text = next(folder.rglob("*_executor.yaml")).read_text()
    assert "nvcr.io/acme/megatron-ivr:0.1" in text and "num_gpus: 4" in text and "/lustre:/lustre" in text
    (script,) = _scripts(folder).values()
    assert "role colocated" in script and "--nproc-per-node 4" in script


@pytest.mark.parametrize("overrides, key", [
    (["launch.gpus_per_node=6", "parallel.tensor_parallel=4"], "launch.gpus_per_node"),
    (["launch.gpus_per_node=8", "parallel.tensor_parallel=16", "launch.nodes=2"], "parallel.tensor_parallel"),
    (["launch.placement=disaggregated", "launch.rollout_nodes=1"], "launch.server_host"),
    (["launch.placement=disaggregated"], "launch.rollout_nodes"),
    (["launch.servers_per_node=3"], "launch.servers_per_node"),
])
def test_impossible_launches_are_refused_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError) as error:  # when the config loads, or when the launch sizes it
        launch("slurm", load_config(None, [*SLURM, f"launch.job_dir={tmp_path}", *overrides]), dryrun=True)
    assert error.value.key == key
    assert not list(tmp_path.rglob("*.sh"))  # nothing rendered


def test_a_job_dir_that_cannot_be_made_is_a_config_error(tmp_path):
    blocker = tmp_path / "not_a_folder"  # a file where the job folder would go (root ignores permissions)
    blocker.write_text("")
    with pytest.raises(ConfigError) as error:
        launch("slurm", load_config(None, [*SLURM, f"launch.job_dir={blocker}/jobs"]), dryrun=True)
    assert error.value.key == "launch.job_dir" and str(blocker) in str(error.value)


def test_launch_local_runs_two_trainer_processes(tmp_path, tiny_models, synthetic_dir):
    config = write_config(tmp_path, tiny_models["qwen2_5_vl"], synthetic_dir)
    overrides = [o for o in RL_OVERRIDES if not o.startswith("trainer.steps")]
    result = subprocess.run(
        [sys.executable, "-m", "megatron_ivr.cli", "launch", "local", str(config), *overrides, "trainer.steps=2",
         "parallel.tensor_parallel=2", "launch.gpus_per_node=2", f"launch.job_dir={tmp_path / 'launches'}"],
        env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert sorted(step_records(tmp_path / "logs")) == [1, 2]
    assert (tmp_path / "checkpoints" / "FINISHED").exists()
    (resolved,) = (tmp_path / "launches").rglob("run_config.yaml")
    assert load_config(resolved).parallel.tensor_parallel == 2
    # two trainer processes ran under torchrun: nemo-run tails each local rank's output
    assert "[default0]" in result.stdout and "[default1]" in result.stdout
    assert "train finished" in result.stdout


def test_launch_local_reports_a_failed_run(tmp_path, synthetic_dir):
    config = write_config(tmp_path, tmp_path / "no_such_model", synthetic_dir)
    result = subprocess.run([sys.executable, "-m", "megatron_ivr.cli", "launch", "local", str(config),
                             "launch.gpus_per_node=1", f"launch.job_dir={tmp_path / 'launches'}"],
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "train FAILED" in result.stdout

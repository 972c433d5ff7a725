"""``megatron-ivr launch {local,slurm,docker} CONFIG [overrides] [--dryrun]`` on nemo-run.

- ``local``: a LocalExecutor runs the trainer under torchrun on this machine
  (``launch.gpus_per_node`` processes; gloo on CPU). When ``rollout.backend=sglang`` and no
  ``rollout.server_urls`` are given, the launcher starts the servers first (the server
  manager) and stops them when the run ends.
- ``slurm``: ``launch.placement=colocated`` is one job whose every node runs the colocated
  node script (launch/scripts.py); ``disaggregated`` is a heterogeneous job, group 0 the
  SGLang servers, group 1 the trainer, each group's script doing its own launching.
- ``docker``: a DockerExecutor runs the colocated node script on one GPU machine.

Every launch gets a folder ``launch.job_dir/<job_name>/<time>/`` holding ``run_config.yaml``
(the resolved config: ``megatron-ivr train run_config.yaml`` reproduces the run) and
nemo-run's experiment (sbatch script, node scripts, logs). nemo-run is imported only here.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from megatron_ivr.config import ConfigError, dump_config
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.launch.scripts import render_node_script, server_specs
from megatron_ivr.rollout.sglang.server import ServerManager, sglang_python

MODES = ("local", "slurm", "docker")


def check_sizing(cfg: RunConfig, mode: str) -> None:
    """The trainer's world (nodes x gpus_per_node) must hold whole TP x PP model replicas whose
    stages split evenly into expert-parallel groups, and on GPUs a TP group must stay inside a
    node (its all-reduces run on NVLink)."""
    launch, parallel = cfg.launch, cfg.parallel
    world = (1 if mode != "slurm" else launch.nodes) * launch.gpus_per_node
    model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
    if world % model_parallel:
        raise ConfigError(f"launch.gpus_per_node: the trainer has {world} processes (launch.nodes x "
                          f"launch.gpus_per_node), not a multiple of parallel.tensor_parallel x "
                          f"parallel.pipeline_parallel = {model_parallel}", key="launch.gpus_per_node")
    experts = parallel.expert_parallel * parallel.expert_tensor_parallel
    if (world // parallel.pipeline_parallel) % experts:
        raise ConfigError(f"parallel.expert_parallel x parallel.expert_tensor_parallel = {parallel.expert_parallel} x "
                          f"{parallel.expert_tensor_parallel} must divide the {world // parallel.pipeline_parallel} "
                          "trainer processes of a pipeline stage", key="parallel.expert_parallel")
    if mode != "local" and launch.gpus_per_node % parallel.tensor_parallel:
        raise ConfigError(f"parallel.tensor_parallel={parallel.tensor_parallel} must divide launch.gpus_per_node="
                          f"{launch.gpus_per_node} (a TP group stays inside one node)", key="parallel.tensor_parallel")
    remote_servers = mode == "slurm" and (launch.placement == "disaggregated" or launch.nodes > 1)
    if remote_servers and launch.server_host in ("127.0.0.1", "localhost"):
        raise ConfigError("launch.server_host: the trainer reads servers on other nodes, which a loopback bind "
                          "refuses; set 0.0.0.0 (or the cluster interface's address) and rollout.api_key",
                          key="launch.server_host")
    if launch.placement == "colocated" and cfg.rollout.mode != "sync" and mode != "local":
        raise ConfigError(f"rollout.mode={cfg.rollout.mode} overlaps generation with training, but colocated servers "
                          "share the trainer's GPUs (their memory is released during training): use "
                          "launch.placement=disaggregated, or rollout.mode=sync", key="rollout.mode")
    if mode == "docker" and not launch.container_image:
        raise ConfigError("launch.container_image: the docker launcher needs an image", key="launch.container_image")


def launch_folder(cfg: RunConfig) -> Path:
    folder = Path(cfg.launch.job_dir).resolve() / cfg.launch.job_name / time.strftime("%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a cluster path (/lustre/...) on a laptop, for a dry run
        raise ConfigError(f"launch.job_dir: cannot create the job folder {folder} ({exc.strerror or exc}); the "
                          f"scripts, logs and run config go there, also for --dryrun: set launch.job_dir to a "
                          f"writable folder (e.g. launch.job_dir=runs/launch)", key="launch.job_dir") from exc
    return folder


def _slurm_executor(cfg: RunConfig, folder: Path, nodes: int, env: dict):
    import nemo_run as run

    launch = cfg.launch
    if launch.ssh_host:
        tunnel = run.SSHTunnel(host=launch.ssh_host, user=launch.ssh_user or os.environ.get("USER", ""),
                               job_dir=launch.remote_job_dir)
    else:
        tunnel = run.LocalTunnel(job_dir=str(folder))
    extra = {"requeue": True} if launch.max_requeues else {}
    return run.SlurmExecutor(
        account=launch.account or "", partition=launch.partition, qos=launch.qos, time=launch.time, nodes=nodes,
        ntasks_per_node=1,  # one node script per node: it starts the servers and torchrun itself
        gpus_per_node=launch.gpus_per_node, exclusive=launch.exclusive or None,
        signal=f"TERM@{launch.preempt_signal_s}" if launch.preempt_signal_s else None,
        container_image=launch.container_image, container_mounts=list(launch.container_mounts),
        env_vars=dict(env, **launch.env), retries=launch.max_requeues, additional_parameters=extra or None,
        job_name_prefix=f"{launch.job_name}.", tunnel=tunnel, packager=run.Packager())


def slurm_tasks(cfg: RunConfig, folder: Path, command: str = "train"):
    """[(name, executor, script)]: one entry (colocated) or two (disaggregated: servers, trainer)."""
    import nemo_run as run

    launch = cfg.launch
    if launch.placement == "colocated" or command == "sft":  # SFT needs no rollout servers
        env = {"MASTER_ADDR": "$head_node_ip", "IVR_ROLLOUT_HOSTS": '"${nodes[*]}"'}
        backend = "local" if command == "sft" else "sglang"
        colocated = replace(cfg, rollout=replace(cfg.rollout, backend=backend))
        script = render_node_script(colocated, "colocated", "cuda", command=command)
        return [("train", _slurm_executor(cfg, folder, launch.nodes, env), run.Script(inline=script))]
    env = {"MASTER_ADDR": "$het_group_host_1",  # the trainer group's first node
           "IVR_ROLLOUT_HOSTS": "\"$(scontrol show hostnames \"$SLURM_JOB_NODELIST_HET_GROUP_0\" | tr '\\n' ' ')\""}
    servers = _slurm_executor(cfg, folder, launch.rollout_nodes, env)
    trainer = _slurm_executor(cfg, folder, launch.nodes, env)
    servers.heterogeneous = trainer.heterogeneous = True
    return [("rollout", servers, run.Script(inline=render_node_script(cfg, "rollout", "cuda"))),
            ("train", trainer, run.Script(inline=render_node_script(cfg, "trainer", "cuda", command=command)))]


def _docker_task(cfg: RunConfig, command: str):
    import nemo_run as run

    launch = cfg.launch
    colocated = replace(cfg, rollout=replace(cfg.rollout, backend="local" if command == "sft" else "sglang"))
    executor = run.DockerExecutor(
        container_image=launch.container_image, num_gpus=launch.gpus_per_node, ntasks_per_node=1,
        volumes=list(launch.container_mounts), env_vars=dict(launch.env), ipc_mode="host", shm_size="16g",
        ulimits=["memlock=-1", "stack=67108864"], packager=run.Packager())
    return executor, run.Script(inline=render_node_script(colocated, "colocated", "cuda", command=command))


def _local_servers(cfg: RunConfig):
    """Start the SGLang servers a local run needs. Returns (manager or None, the config the
    trainer runs: with the servers' URLs written into it, not passed as arguments, which
    torchx would quote)."""
    if cfg.rollout.backend != "sglang" or cfg.rollout.server_urls:
        return None, cfg
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    python = sglang_python(Path.cwd()) or cfg.launch.sglang_python
    specs = [replace(spec, python=python) for spec in server_specs(cfg, device)]  # bind: launch.server_host
    print(f"[launch] starting {len(specs)} SGLang server(s) with {python}", flush=True)
    manager = ServerManager(specs, startup_timeout_s=cfg.launch.server_startup_timeout_s).start()
    rollout = replace(cfg.rollout, server_urls=manager.urls, weight_transport="tensor")
    return manager, replace(cfg, rollout=rollout)


def _local_task(cfg: RunConfig, config_path: Path, command: str):
    import nemo_run as run

    env = dict(cfg.launch.env)
    env.setdefault("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("LOGLEVEL", "WARNING")  # torchrun's per-start INFO banner (nemo-run asks for INFO)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    executor = run.LocalExecutor(ntasks_per_node=cfg.launch.gpus_per_node, launcher="torchrun", env_vars=env)
    script = run.Script(path="megatron_ivr.cli", m=True, entrypoint="python",
                        args=[command, str(config_path)])
    return executor, script


def _succeeded(experiment) -> bool:
    statuses = experiment.status(return_dict=True) or {}
    return all(str(info.get("status", "")).upper().endswith("SUCCEEDED") for info in statuses.values())


def launch(mode: str, cfg: RunConfig, dryrun: bool = False, command: str = "train",
           folder: Optional[Path] = None) -> int:
    """Launch (or with ``dryrun`` only render) ``megatron-ivr COMMAND`` as ``mode`` says.
    Returns the exit status for the CLI."""
    if mode not in MODES:
        raise ConfigError(f"launch mode {mode!r} is not one of {list(MODES)}")
    cfg.validate()
    check_sizing(cfg, mode)
    try:
        import nemo_run as run
    except ImportError as exc:
        raise ConfigError("megatron-ivr launch needs nemo-run: pip install 'megatron-ivr[launch]'") from exc

    folder = folder or launch_folder(cfg)
    config_path = folder / "run_config.yaml"
    manager = None
    try:
        if mode == "local" and not dryrun:
            manager, cfg = _local_servers(cfg)
        config_path.write_text(dump_config(cfg))
        print(f"[launch] {mode}: resolved config in {config_path}", flush=True)
        with run.Experiment(cfg.launch.job_name, base_dir=str(folder), log_level="WARN") as experiment:
            if mode == "slurm":
                tasks = slurm_tasks(cfg, folder, command)
                if len(tasks) == 1:
                    name, executor, script = tasks[0]
                    experiment.add(script, executor=executor, name=name)
                else:
                    experiment.add([t[2] for t in tasks], executor=[t[1] for t in tasks],
                                   name=cfg.launch.job_name)
            elif mode == "docker":
                executor, script = _docker_task(cfg, command)
                experiment.add(script, executor=executor, name=command)
            else:
                executor, script = _local_task(cfg, config_path, command)
                experiment.add(script, executor=executor, name=command)
            if dryrun:
                experiment.dryrun(log=False, delete_exp_dir=False)
            else:
                experiment.run(detach=mode != "local", tail_logs=mode == "local", sequential=True)
        # leaving the block waited for a local run to end
    finally:
        if manager is not None:
            manager.shutdown()
    if dryrun:
        print(f"[launch] dry run: scripts under {folder}", flush=True)
        for path in sorted(folder.rglob("*.sh")):
            print(f"  {path}")
        return 0
    if mode == "local":
        ok = _succeeded(experiment)
        print(f"[launch] {command} {'finished' if ok else 'FAILED'}; logs under {folder}", flush=True)
        return 0 if ok else 1
    print(f"[launch] submitted; job folder {folder}", flush=True)
    return 0


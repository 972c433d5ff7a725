"""The bash that each node of a launch runs, rendered from the run config.

One renderer, three roles (the placements of ``launch.placement``):

- ``colocated``: start this node's SGLang server(s) in the background, wait until the
  servers of every node answer, then run this node's trainer ranks with torchrun
  (Slurm colocated, Docker). The servers release their GPU memory while the trainer trains.
- ``rollout``: start this node's servers and wait on them (disaggregated, het group 0).
- ``trainer``: wait for the rollout group's servers, then torchrun (disaggregated, group 1).

Each group's script does its own launching (nemo-run uses only the first executor's
launcher in a heterogeneous job). The scripts read what Slurm provides, with one-node
defaults, so the same text runs under srun, in a Docker container, or in a test here:

- ``SLURM_PROCID`` (one task per node: this node's index in its group; default 0),
- ``MASTER_ADDR`` (the trainer head node; the sbatch exports it; default 127.0.0.1),
- ``IVR_ROLLOUT_HOSTS`` (space-separated hosts that serve rollouts; default 127.0.0.1).

Preemption: Slurm sends SIGTERM to every process of the step ``launch.preempt_signal_s``
before the time limit. The script ignores it itself and tells torchrun not to handle it
(``PET_SIGNALS_TO_HANDLE``), so torchrun does not kill its workers 30 s later; the
trainer ranks install their own handler, finish the step, save and exit 0. The script then
exits with :data:`REQUEUE_EXIT` when the run has not reached its last step (no ``FINISHED``
marker in ``checkpoint.dir``), and the sbatch requeues the job (``launch.max_requeues``);
the requeued job resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import shlex
from typing import Literal

from megatron_ivr.config import dump_config
from megatron_ivr.config.schema import RunConfig
from megatron_ivr.rollout.sglang.server import ServerSpec

Role = Literal["colocated", "rollout", "trainer"]
REQUEUE_EXIT = 75  # EX_TEMPFAIL: stopped before the last step; the job asks to be requeued
CONFIG_MARKER = "MEGATRON_IVR_RUN_CONFIG"


def server_specs(cfg: RunConfig, device: str) -> list[ServerSpec]:
    """This node's SGLang servers: ``servers_per_node`` of them, each on its own GPUs."""
    launch = cfg.launch
    tp = launch.gpus_per_node // launch.servers_per_node
    extra = list(launch.server_args)
    if device == "cuda":
        extra = ["--tp-size", str(tp)] + extra
        if launch.placement == "colocated":
            extra = ["--enable-memory-saver"] + extra  # release/resume_memory_occupation
        if launch.server_mem_fraction is not None:
            extra = ["--mem-fraction-static", str(launch.server_mem_fraction)] + extra
    return [ServerSpec(model_path=cfg.model.path, port=launch.server_port + i, host=launch.server_host,
                       device=device, api_key=cfg.rollout.api_key, extra_args=extra, python=launch.sglang_python,
                       max_total_tokens=8192 if device == "cpu" else None)
            for i in range(launch.servers_per_node)]


def server_tp_size(cfg: RunConfig, device: str) -> int:
    return cfg.launch.gpus_per_node // cfg.launch.servers_per_node if device == "cuda" else 1


def weight_transport(cfg: RunConfig) -> str:
    """Colocated on one node: CUDA-IPC handles (``tensor``); across nodes: NCCL broadcast
    from trainer rank 0 to every server rank (``distributed``)."""
    if cfg.launch.placement == "colocated" and cfg.launch.nodes == 1:
        return "tensor"
    return "distributed"


def trainer_overrides(cfg: RunConfig, role: Role, device: str) -> list[str]:
    """What the launch adds to the resolved config on the trainer's command line; the shell
    fills in ``$IVR_SERVER_URLS`` and ``$MASTER_ADDR`` on the node."""
    if role == "trainer" or cfg.rollout.backend == "sglang":
        out = ["rollout.backend=sglang", "rollout.server_urls=$IVR_SERVER_URLS",
               f"rollout.weight_transport={weight_transport(cfg)}", "rollout.sync_master_address=$MASTER_ADDR",
               f"rollout.server_tp_size={server_tp_size(cfg, device)}"]
        if role == "colocated" and device == "cuda":
            out.append("rollout.offload_during_train=true")
        return out
    return []


def _server_block(cfg: RunConfig, device: str) -> list[str]:
    lines = ["# this node's SGLang servers (the multimodal cache off: it would survive weight updates)",
             "server_pids=()"]
    for index, spec in enumerate(server_specs(cfg, device)):
        tp = server_tp_size(cfg, device)
        gpus = ",".join(str(g) for g in range(index * tp, (index + 1) * tp))
        overrides = dict(spec.env_overrides(), **({"CUDA_VISIBLE_DEVICES": gpus} if device == "cuda" else {}))
        env = " ".join(f"{key}={value}" for key, value in overrides.items())
        # with a key: the bootstrap reads $MEGATRON_IVR_API_KEY (exported above), never argv
        lines += [f"{env} setsid {shlex.join(spec.command(with_api_key=bool(cfg.rollout.api_key)))} \\",
                  f'    > "$log_dir/sglang_node${{node_rank}}_{index}.log" 2>&1 &',
                  "server_pids+=($!)"]
    # the servers ignore SIGTERM like the script (the trainer still needs them for its last weight
    # sync after a preemption signal); each leads its own process group, killed as a whole at exit
    lines.append("trap 'for pid in \"${server_pids[@]}\"; do kill -KILL -- -\"$pid\" 2>/dev/null; done' EXIT")
    return lines


def _url_block(cfg: RunConfig) -> list[str]:
    ports = " ".join(str(cfg.launch.server_port + i) for i in range(cfg.launch.servers_per_node))
    return ["# every server of the rollout hosts, as a YAML list for rollout.server_urls",
            "urls=()",
            'for host in ${IVR_ROLLOUT_HOSTS:-127.0.0.1}; do',
            f"    for port in {ports}; do urls+=(\"\\\"http://$host:$port\\\"\"); done",
            "done",
            'IVR_SERVER_URLS="[$(IFS=,; echo "${urls[*]}")]"',
            "plain_urls=$(printf '%s ' \"${urls[@]}\" | tr -d '\"')"]


def _trainer_block(cfg: RunConfig, role: Role, device: str, python: str, command: str) -> list[str]:
    launch = cfg.launch
    nnodes = launch.nodes
    overrides = " ".join(f'"{o}"' for o in trainer_overrides(cfg, role, device))
    finished = shlex.quote(f"{cfg.checkpoint.dir}/FINISHED")
    lines = []
    if overrides:
        lines += _url_block(cfg) + [
            f"{python} -m megatron_ivr.rollout.sglang.wait --timeout {launch.server_startup_timeout_s} $plain_urls "
            "|| exit 1"]
    lines += [
        "# this node's trainer ranks; torchrun leaves SIGTERM to them (they save, then exit 0)",
        "export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT",
        f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={max(30, launch.preempt_signal_s)}  # torch without the above",
        f"{python} -m torch.distributed.run --nnodes {nnodes} --node-rank \"$node_rank\" "
        f"--nproc-per-node {launch.gpus_per_node} --master-addr \"${{MASTER_ADDR:-127.0.0.1}}\" "
        f"--master-port {launch.master_port} \\",
        f"    -m megatron_ivr.cli {command} \"$run_config\" {overrides}".rstrip(),
        "status=$?",
        f"if [ \"$status\" -eq 0 ] && [ ! -f {finished} ]; then",
        f"    echo \"[launch] the run stopped before its last step: exit {REQUEUE_EXIT} so that Slurm requeues it\"",
        f"    status={REQUEUE_EXIT}",
        "fi",
        "exit \"$status\""]
    return lines


def render_node_script(cfg: RunConfig, role: Role, device: str = "cuda", python: str = "python",
                       command: str = "train") -> str:
    """The script one node of ``role`` runs. ``device``: ``cuda`` (servers on GPUs) or
    ``cpu`` (SGLang's CPU engine; tests). ``command``: the trainer subcommand (train, sft)."""
    if role not in ("colocated", "rollout", "trainer"):
        raise ValueError(f"unknown role {role!r}")
    starts_servers = role == "rollout" or (role == "colocated" and cfg.rollout.backend == "sglang")
    lines = [f"# megatron-ivr node script, role {role} (rendered by launch/scripts.py)",
             "set -o pipefail",
             "trap '' TERM  # the trainer ranks handle SIGTERM (see launch/scripts.py)",
             "node_rank=${SLURM_PROCID:-0}  # one task per node: the node's index in its group",
             'log_dir=${IVR_LOG_DIR:-logs}',
             'mkdir -p "$log_dir"']
    for key, value in sorted(cfg.launch.env.items()):
        lines.append(f"export {key}={shlex.quote(value)}")
    if cfg.rollout.api_key:
        lines.append(f"export MEGATRON_IVR_API_KEY={shlex.quote(cfg.rollout.api_key)}")
    if role != "rollout":
        lines += ["# the resolved run config of this launch (also beside the job as run_config.yaml)",
                  'run_config=$(mktemp "${TMPDIR:-/tmp}/megatron-ivr-config.XXXXXX")',
                  f"cat > \"$run_config\" <<'{CONFIG_MARKER}'",
                  dump_config(cfg).rstrip("\n"),
                  CONFIG_MARKER]
    if starts_servers:
        lines += _server_block(cfg, device)
    if role == "rollout":
        lines += ["# serve until a server exits (the job ends when the trainer group ends)",
                  "wait -n \"${server_pids[@]}\"",
                  "status=$?",
                  "echo \"[launch] an SGLang server exited with $status\"",
                  "exit \"$status\""]
    else:
        lines += _trainer_block(cfg, role, device, python, command)
    return "\n".join(lines) + "\n"

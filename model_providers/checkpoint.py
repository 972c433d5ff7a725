"""Trainer checkpoints: model and optimizer through megatron's ``dist_checkpointing`` (loads
at any layout for the model), plus the trainer state and every rank's RNG states.

Layout of ``{dir}/step_{N:08d}/``::

    dist/               dist_checkpointing (torch_dist): model weights and optimizer state
                        (the distributed optimizer's shards), in one save; with
                        ``megatron_ivr.json`` and ``hf/`` it is also a converter checkpoint:
                        ``megatron-ivr convert megatron-to-hf step_N/dist OUT``
    trainer_state.json  step, the job's state (sample order position, engine weight version),
                        the LR scheduler, the layout
    rng/rank_{r}.json   torch / python / numpy RNG states and megatron's model-parallel RNG
                        streams of rank r (JSON: nothing unpickled)
    COMPLETE            written last: the size and SHA-256 of every file above (the manifest,
                        ``model_providers/manifest.py``; the ranks hash their shares)

A save goes to ``step_N.tmp`` and is renamed when complete, so a crash mid-save leaves the
previous checkpoint the newest loadable one. Resume takes the newest checkpoint whose every
file matches its manifest in size and content, checked before anything is unpickled; a
damaged one (truncated, or changed without a change of size) is reported and the previous
one is taken; if every checkpoint fails, the run stops with the reason instead of silently
starting over. Only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_ivr.config.errors import ConfigError
from megatron_ivr.model_providers.convert import META_NAME
from megatron_ivr.model_providers.hf_checkpoint import SIDE_FILES, save_carried_tensors
from megatron_ivr.model_providers.lifetime import manager_initializer
from megatron_ivr.model_providers.manifest import (
    MANIFEST,
    CheckpointRefused,
    content_problem_collectively,
    gather_digests,
    listed_files,
    size_problem,
    write_manifest,
)

logger = logging.getLogger(__name__)

COMPLETE = MANIFEST
FINISHED = "FINISHED"  # in the checkpoint root: the run reached its last step (launchers stop requeueing)
# optimizer state in the model's parameter space, gathered per parameter: loads at another layout too
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def is_complete(folder: Path) -> bool:
    """The manifest exists and every file it lists is there with its size (cheap: no hashing)."""
    problem = size_problem(folder)
    if problem is not None and (folder / COMPLETE).exists():
        logger.warning("checkpoint %s is damaged (%s): skipped", folder, problem)
    return problem is None


def step_folders(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step_NNNNNNNN`` folder under ``root``, oldest first."""
    root = Path(root)
    return sorted((int(m.group(1)), child) for child in (root.iterdir() if root.is_dir() else ())
                  if (m := _STEP_DIR.match(child.name)))


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root`` (sizes checked), oldest first."""
    return [(step, folder) for step, folder in step_folders(root) if is_complete(folder)]


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    saved = {"torch": torch.get_rng_state().tolist(), "python": [version, list(state), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        saved["cuda"] = torch.cuda.get_rng_state().tolist()
    saved["model_parallel"] = {name: _generator_state(state).tolist()
                               for name, state in _tracker().get_states().items()}
    return saved


def _tracker():
    """megatron's model-parallel RNG tracker (its named streams: the TP-rank-specific one
    that dropout and initialization inside tensor-parallel regions draw from)."""
    return get_cuda_rng_tracker()


def _generator_state(state) -> torch.Tensor:
    """A tracker stream's state: a byte tensor, or a generator (CUDA-graph-safe streams)."""
    return state.get_state() if isinstance(state, torch.Generator) else state


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(saved["cuda"], dtype=torch.uint8))
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    streams = dict(_tracker().get_states())
    for name, values in saved.get("model_parallel", {}).items():
        state = torch.tensor(values, dtype=torch.uint8)
        if isinstance(streams.get(name), torch.Generator):
            streams[name].set_state(state)
        else:
            streams[name] = state
    if streams:
        _tracker().set_states(streams)


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state to load into: megatron fills it with a step on zero
    gradients (its own helper). The learning rate is 0 meanwhile, so weight decay cannot move
    a parameter; the state and parameters are then overwritten by the checkpoint."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if inner.optimizer.state:
            continue
        saved = [group["lr"] for group in inner.optimizer.param_groups]
        for group in inner.optimizer.param_groups:
            group["lr"] = 0.0
        inner._init_optimizer_states_with_dummy_values()
        for group, lr in zip(inner.optimizer.param_groups, saved):
            group["lr"] = lr


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` for megatron's distributed optimizer over torch's Adam (no
    Apex/TE): torch keeps a per-parameter ``step`` that the fully reshardable format stores
    once in the param groups (megatron restores it from there) and not per parameter, so the
    per-parameter copy is told to keep the restored value instead of failing on the key.
    ``tests/training/test_rl_runs.py::test_exact_resume_after_sigkill`` checks the result."""
    patched = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = inner._set_main_param_and_optimizer_states

        def tolerant(model_param, tensors, inner=inner, original=original):
            current = inner._get_main_param_and_optimizer_states(model_param)
            original(model_param, {**{k: v for k, v in current.items() if k not in tensors}, **tensors})

        inner._set_main_param_and_optimizer_states = tolerant
        patched.append(inner)
    try:
        optimizer.load_state_dict(state)
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # back to the class method
    # megatron gives every parameter the *same* restored ``step`` tensor; torch's foreach Adam
    # increments each listed step in place, so a shared one would advance once per parameter
    for inner in patched:
        for param_state in inner.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def _writer_queue_survives_sigterm() -> None:
    """Workaround (megatron-core 0.16): dist_checkpointing's writer collects results through a
    ``multiprocessing`` Manager started once, with the *spawn* context, at the first save. A
    spawned interpreter does not keep our SIGTERM handler, so the SIGTERM that Slurm sends to
    every process of a job step before the time limit kills the Manager, and the very save
    that the signal asks for fails (BrokenPipeError). Started here instead, the Manager ignores
    SIGTERM and ends with this rank (``lifetime.manager_initializer``: without it, it outlived
    a SIGKILLed rank for minutes). Found by tests/launch/test_scripts.py."""
    import threading
    from multiprocessing import get_context
    from multiprocessing.managers import SyncManager

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None or threading.current_thread() is not \
            threading.main_thread():
        return
    manager = SyncManager(ctx=get_context("spawn"))
    manager.start(manager_initializer)
    filesystem_async._results_queue = manager.Queue()
    _MANAGERS.append(manager)  # kept alive with the queue


_MANAGERS: list = []


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int = 2, source_dir: Optional[str] = None):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.source_dir = source_dir  # the HF folder the policy came from (config, tokenizer, processor)

    def newest_verified(self, report=print) -> Optional[tuple[int, Path]]:
        """Collective: the newest checkpoint whose files match their manifest in content
        (SHA-256), checked before anything in it is unpickled; ``report`` tells of each one
        passed over. None when there is no checkpoint; an error when none passes."""
        candidates = [(step, folder) for step, folder in step_folders(self.root) if (folder / COMPLETE).exists()]
        for step, folder in reversed(candidates):
            problem = content_problem_collectively(folder)
            if problem is None:
                return step, folder
            report(f"[checkpoint] {folder} fails its manifest ({problem}): not loaded; trying the previous one")
        if candidates:
            raise CheckpointRefused(f"{self.root}: no checkpoint passes its manifest (each is named above); nothing "
                                    f"was loaded. Move the damaged folders aside to start over, or set another "
                                    f"checkpoint.dir")
        return None

    def mark_finished(self, step: int) -> None:
        """Rank 0: the run has completed all its steps (a stop by signal does not write this)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / FINISHED).write_text(json.dumps({"step": step}))

    def save(self, step: int, policy, trainer_state: dict) -> float:
        """Collective: every rank writes its shards. Returns the seconds taken."""
        start = time.perf_counter()
        rank = dist.get_rank()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in ("rng", "dist"):
                (tmp / sub).mkdir(parents=True)
        dist.barrier()
        _writer_queue_survives_sigterm()
        state = {"model": policy.model.sharded_state_dict()}
        state["optimizer"] = policy.optimizer.sharded_state_dict(policy.model.sharded_state_dict(),
                                                                 metadata=OPTIMIZER_METADATA)
        dist_checkpointing.save(state, str(tmp / "dist"))
        (tmp / "rng" / f"rank_{rank}.json").write_text(json.dumps(rng_state()))
        dist.barrier()
        if rank == 0:
            self._write_converter_files(tmp / "dist", policy)
            state = dict(trainer_state, step=step, scheduler=policy.scheduler.state_dict(),
                         world_size=dist.get_world_size())
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        dist.barrier()
        digests = gather_digests(tmp, listed_files(tmp))  # every rank hashes its share
        if rank == 0:
            write_manifest(tmp, digests, step=step)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in complete_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return time.perf_counter() - start

    def _not_this_model(self, folder: Path, exc: Exception):
        """The error for resuming from a checkpoint of another model (a reused checkpoint.dir)."""
        meta_file = folder / "dist" / META_NAME
        source = json.loads(meta_file.read_text()).get("source") if meta_file.exists() else None
        failures = getattr(exc, "failures", None)  # torch's CheckpointException wraps each rank's error
        cause = next(iter(failures.values()), exc) if failures else exc
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        text = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(cause)
        detail = (text.splitlines() or [type(cause).__name__])[0][:200]
        return ConfigError(f"{folder} holds a checkpoint of another model (saved from {source}; this run's model is "
                           f"{self.source_dir}): set another checkpoint.dir, or empty this one ({detail} ...)",
                           key="checkpoint.dir")

    def _write_converter_files(self, folder: Path, policy) -> None:
        dtype = str(policy.model.config.params_dtype).replace("torch.", "")
        meta = {"family": policy.family.name, "tp": ps.get_tensor_model_parallel_world_size(),
                "pp": ps.get_pipeline_model_parallel_world_size(), "dtype": dtype, "key_style": policy.key_style,
                "source": self.source_dir}
        (folder / META_NAME).write_text(json.dumps(meta, indent=2))
        if self.source_dir is not None:
            (folder / "hf").mkdir()
            for name in SIDE_FILES:
                if (Path(self.source_dir) / name).exists():
                    shutil.copy2(Path(self.source_dir) / name, folder / "hf" / name)
            save_carried_tensors(self.source_dir, folder / "hf")

    def load(self, folder: Path, policy) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
        from torch.distributed.checkpoint.api import CheckpointException

        _materialize_optimizer_state(policy.optimizer)
        try:
            loaded = dist_checkpointing.load({"model": policy.model.sharded_state_dict()}, str(folder / "dist"))
        except (KeyError, CheckpointingException, CheckpointException) as exc:  # tensors missing or reshaped
            raise self._not_this_model(folder, exc) from None
        policy.model.load_state_dict(loaded["model"], strict=True)
        optimizer_state = policy.optimizer.sharded_state_dict(policy.model.sharded_state_dict(), is_loading=True,
                                                              metadata=OPTIMIZER_METADATA)
        loaded = dist_checkpointing.load({"optimizer": optimizer_state}, str(folder / "dist"))
        _load_optimizer_state(policy.optimizer, loaded["optimizer"])
        state = json.loads((folder / "trainer_state.json").read_text())
        policy.scheduler.load_state_dict(state["scheduler"])
        rng_file = folder / "rng" / f"rank_{dist.get_rank()}.json"
        if rng_file.exists() and state.get("world_size") == dist.get_world_size():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            logger.warning("%s: no RNG state for this rank (layout changed); RNG streams restart", folder)
        return state

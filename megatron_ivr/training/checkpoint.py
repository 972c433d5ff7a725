"""Trainer checkpoints: model and optimizer through megatron's ``dist_checkpointing`` (loads
at any layout for the model), plus the trainer state and every rank's RNG states.

Layout of ``{dir}/step_{N:08d}/``::

    dist/               dist_checkpointing (torch_dist): model weights and optimizer state
                        (the distributed optimizer's shards), in one save; with
                        ``megatron_ivr.json`` and ``hf/`` it is also a converter checkpoint:
                        ``megatron-ivr convert megatron-to-hf step_N/dist OUT``
    trainer_state.json  step, the job's state (sample order position, engine weight version),
                        the LR scheduler, the layout
    rng/rank_{r}.json   torch / python / numpy RNG states of rank r (JSON: nothing unpickled)
    COMPLETE            written last: a folder without it is never loaded

A save goes to ``step_N.tmp`` and is renamed when complete, so a crash mid-save leaves the
previous checkpoint the newest loadable one. Only the newest ``keep_last`` are kept.
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

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
# optimizer state in the model's parameter space, gathered per parameter: loads at another layout too
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / COMPLETE).exists():
                found.append((int(match.group(1)), child))
    return sorted(found)


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(), "python": [version, list(state), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def set_rng_state(saved: dict) -> None:
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class Checkpointer:
    def __init__(self, root: str | Path, keep_last: int = 2, source_dir: Optional[str] = None):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)
        self.source_dir = source_dir  # the HF folder the policy came from (config, tokenizer, processor)

    def newest(self) -> Optional[tuple[int, Path]]:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, step: int, policy, trainer_state: dict) -> float:
        """Collective: every rank writes its shards. Returns the seconds taken."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        start = time.perf_counter()
        rank = dist.get_rank()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            for sub in ("rng", "dist"):
                (tmp / sub).mkdir(parents=True)
        dist.barrier()
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
            (tmp / COMPLETE).write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for _, old in complete_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return time.perf_counter() - start

    def _write_converter_files(self, folder: Path, policy) -> None:
        from megatron.core import parallel_state as ps

        from model_providers.convert import META_NAME
        from model_providers.hf_checkpoint import SIDE_FILES

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

    def load(self, folder: Path, policy) -> dict:
        """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
        import torch.distributed as dist
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load({"model": policy.model.sharded_state_dict()}, str(folder / "dist"))
        policy.model.load_state_dict(loaded["model"], strict=True)
        optimizer_state = policy.optimizer.sharded_state_dict(policy.model.sharded_state_dict(), is_loading=True,
                                                              metadata=OPTIMIZER_METADATA)
        loaded = dist_checkpointing.load({"optimizer": optimizer_state}, str(folder / "dist"))
        policy.optimizer.load_state_dict(loaded["optimizer"])
        state = json.loads((folder / "trainer_state.json").read_text())
        policy.scheduler.load_state_dict(state["scheduler"])
        rng_file = folder / "rng" / f"rank_{dist.get_rank()}.json"
        if rng_file.exists() and state.get("world_size") == dist.get_world_size():
            set_rng_state(json.loads(rng_file.read_text()))
        else:
            logger.warning("%s: no RNG state for this rank (layout changed); RNG streams restart", folder)
        return state

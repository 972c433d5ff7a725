"""Hugging Face checkpoint folders: lazy reading of safetensors shards, atomic writing.

Reading never loads the whole model: :class:`HFCheckpoint` opens each shard lazily and
reads one tensor at a time. Writing goes to a fresh staging folder that is published into
place at the end (``output_dir.py``: an interrupted export never leaves a half-written folder
under the final name, and a folder that megatron-ivr did not write is never replaced).

Carried tensors: checkpoint tensors that are not part of the policy (Qwen3.5's
multi-token-prediction heads, ``mtp.*``: transformers does not build them, RL does not train
them) travel verbatim. A Megatron checkpoint keeps them in ``hf/carried.safetensors``; every HF
folder written from a source (exports, conversions, weight pushes to disk) gets the source's
carried tensors back, bit for bit (:func:`carried_tensors`).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_ivr.model_providers.output_dir import discard, publish, staging_dir

INDEX_NAME = "model.safetensors.index.json"
CARRIED_PREFIXES = ("mtp.",)  # multi-token-prediction heads (Qwen3.5, Qwen3-Next)
CARRIED_FILE = "carried.safetensors"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
              "preprocessor_config.json", "vocab.json", "merges.txt")


class HFCheckpoint:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            with safe_open(self.path / "model.safetensors", "pt") as handle:
                weight_map = {name: "model.safetensors" for name in handle.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict = {}

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.path / shard, "pt")
        return self._handles[shard]

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.path))


def carried_tensors(folder: str | Path | None) -> dict[str, torch.Tensor]:
    """The carried tensors (module docstring) of ``folder``: its ``carried.safetensors`` when it
    has one (a Megatron checkpoint's ``hf/``), else those among its own weights; {} for None or
    a folder with neither."""
    if folder is None:
        return {}
    folder = Path(folder)
    if (folder / CARRIED_FILE).is_file():
        return load_file(str(folder / CARRIED_FILE))
    try:
        checkpoint = HFCheckpoint(folder)
    except FileNotFoundError:
        return {}
    return {name: checkpoint.read(name) for name in checkpoint.names() if name.startswith(CARRIED_PREFIXES)}


def save_carried_tensors(source: str | Path, folder: str | Path) -> None:
    """Keep ``source``'s carried tensors in ``folder/carried.safetensors`` (nothing when it has none)."""
    tensors = carried_tensors(source)
    if tensors:
        save_file(tensors, str(Path(folder) / CARRIED_FILE), metadata={"format": "pt"})


def write_hf_folder(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: str | Path, source_dir: str | Path | None,
                    max_shard_bytes: int = 2 * 1024**3, overwrite: bool = True, key: str = "OUT") -> Path:
    """Write safetensors shards plus an index, copy config/tokenizer/processor files and the
    carried tensors (:func:`carried_tensors`) from ``source_dir``; staged and
    published (``output_dir.publish``: an earlier HF output of ours
    is replaced when ``overwrite``, anything else is refused)."""
    tmp = staging_dir(out_dir)
    try:
        _write_shards(tensors, tmp, source_dir, max_shard_bytes)
    except BaseException:
        discard(tmp)
        raise
    return publish(tmp, out_dir, "hf", overwrite=overwrite, key=key)


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, source_dir: str | Path | None,
                  max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    written: set[str] = set()
    for name, tensor in itertools.chain(tensors, carried_tensors(source_dir).items()):
        if name in written:
            raise ValueError(f"{name}: written twice (a carried tensor the model also holds?)")
        written.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.detach().contiguous().cpu()
        sizes[-1] += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    if len(shards) > 1:
        (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    if source_dir is not None:
        for name in SIDE_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, folder / name)

"""Content manifests of Megatron checkpoint folders (trainer checkpoints and ``convert`` outputs).

``COMPLETE`` is written last, beside the files it lists: the size and SHA-256 of every file in
the folder. A folder is loaded only after every listed file is there with its size and hash,
so a truncated, damaged (even without a change of size) or foreign folder is refused before
megatron-core or torch read a byte of it. That matters beyond corruption: torch's distributed
checkpoint reader unpickles ``dist/.metadata`` and megatron-core unpickles ``common.pt``, so a
Megatron checkpoint is code, like any pickle.

What the manifest guarantees, and what not (docs/training.md, "Trust"): it proves that the
files are the ones written by the save that wrote the manifest. It is not a signature: anyone
who can write the folder can write a matching manifest. Load checkpoints only from a source
you trust, as torch and megatron-core say of their own formats.

Hashing is shared out: with ``share=(rank, world)`` a rank hashes every ``world``-th file, so
the ranks of a job hash a large checkpoint together (``gather_digests``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

MANIFEST = "COMPLETE"
_SKIP = {MANIFEST, ".megatron-ivr-output.json"}  # the output marker (output_dir.MARKER) is written after
_CHUNK = 8 * 1024 * 1024


class CheckpointRefused(ValueError):
    """A checkpoint folder that fails its manifest or has none: nothing in it was loaded."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` (relative, sorted) except the manifest and the marker."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in _SKIP)


def hash_files(folder: Path, names: list[str], share: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """SHA-256 of this rank's share of ``names`` (every ``world``-th one from ``rank``)."""
    rank, world = share
    return {name: file_sha256(folder / name) for name in names[rank::world]}


def gather_digests(folder: Path, names: list[str]) -> dict[str, str]:
    """Collective: every rank hashes its share; every rank gets all digests."""
    world = dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, hash_files(folder, names, (dist.get_rank(), world)))
    return {name: digest for part in parts for name, digest in part.items()}


def content_problem_collectively(folder: Path) -> Optional[str]:
    """Collective: every rank checks its share of the hashes (:func:`content_problem`); every
    rank gets the first problem found, or None."""
    world = dist.get_world_size()
    problems: list = [None] * world
    dist.all_gather_object(problems, content_problem(folder, (dist.get_rank(), world)))
    return next((problem for problem in problems if problem is not None), None)


def write_manifest(folder: Path, digests: Optional[dict[str, str]] = None, **extra) -> None:
    """Write ``COMPLETE`` listing every file of ``folder`` (``digests`` precomputed by the ranks,
    any missing one computed here). Call it last."""
    names = listed_files(folder)
    digests = dict(digests or {})
    files = {name: {"size": (folder / name).stat().st_size,
                    "sha256": digests.get(name) or file_sha256(folder / name)} for name in names}
    (folder / MANIFEST).write_text(json.dumps({**extra, "files": files}, indent=1))


def read_manifest(folder: Path) -> Optional[dict]:
    """``{name: {size, sha256}}`` from ``folder``'s manifest, or None if there is no usable one."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict) or not all(isinstance(v, dict) and "sha256" in v and "size" in v
                                              for v in files.values()):
        return None  # no manifest, or one without content hashes (an older megatron-ivr)
    return files


def size_problem(folder: Path) -> Optional[str]:
    """Cheap check (listing, pruning): the manifest is usable and every file has its size."""
    files = read_manifest(folder)
    if files is None:
        return f"no {MANIFEST} manifest with content hashes"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return f"{name} is missing or has another size"
    return None


def content_problem(folder: Path, share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """Full check of this rank's share: sizes, unlisted files in ``dist/``, and SHA-256."""
    problem = size_problem(folder)
    if problem is not None:
        return problem
    files = read_manifest(folder)
    extra = sorted(set(listed_files(folder)) - set(files))
    if extra:
        return f"{extra[0]} is not in the manifest"
    names = sorted(files)
    for name, digest in hash_files(folder, names, share).items():
        if digest != files[name]["sha256"]:
            return f"{name}: content differs from the manifest (SHA-256)"
    return None


def manifest_folder(megatron_dir: Path) -> Path:
    """The folder whose manifest covers ``megatron_dir``: itself (a ``convert`` output) or, for
    a trainer checkpoint's ``step_N/dist``, ``step_N``."""
    if not (megatron_dir / MANIFEST).exists() and megatron_dir.name == "dist" and \
            (megatron_dir.parent / MANIFEST).exists():
        return megatron_dir.parent
    return megatron_dir


def require_verified(megatron_dir: str | Path) -> None:
    """Refuse (:class:`CheckpointRefused`) a Megatron folder that fails its manifest."""
    megatron_dir = Path(megatron_dir)
    folder = manifest_folder(megatron_dir)
    problem = content_problem(folder)
    if problem is not None:
        raise CheckpointRefused(f"{megatron_dir}: refused before loading (a Megatron checkpoint holds pickles, so "
                                f"only a folder that passes its manifest is read): {problem}")

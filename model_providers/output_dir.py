"""Output folders that lose nothing: every command that writes a model folder (``convert``, the
SFT and RL exports, the ``disk`` weight transport) goes through here.

The rules (docs/reliability.md lists the test of each):

- An output folder equal to, inside, or holding one of the command's sources is refused, and
  so is one that holds another protected folder of the run (its checkpoints, its logs).
- An existing output folder that is not empty is refused, unless it carries :data:`MARKER`
  (an earlier output of the same kind, written by megatron-ivr) *and* overwriting was asked
  for (``convert --overwrite``; the trainer's own exports are replaced by a rerun or resume
  of the same config).
- The output is written into a fresh hidden sibling folder (a name no one else has:
  ``mkdtemp``), and the marker is written last. Publishing swaps the new folder and the old
  one in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux, local file systems), then deletes
  the old one: a kill at any point leaves the old output or the new one under the final name,
  never neither, and never a half-written one. Where the exchange is not supported (NFS,
  other systems) the old output is renamed aside (``.OUT.<id>.old``) and the new one renamed
  in: two renames microseconds apart, and a kill between them leaves the old one at that name.
- On failure only the staging folder, which this module created, is removed.

The checks run twice: before the long work (so a refused folder costs nothing) and again at
publishing (a folder that appeared meanwhile is not replaced; the finished output is left in
its staging folder, and the error says where).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from megatron_ivr.config.errors import ConfigError

MARKER = ".megatron-ivr-output.json"
KINDS = ("hf", "megatron")


class OutputRefused(ConfigError):
    """An output folder that the command will not write to (it would lose something)."""


def output_kind(folder: str | Path) -> str | None:
    """The kind recorded in ``folder``'s marker, or None (no marker, or not ours)."""
    try:
        kind = json.loads((Path(folder) / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(out: str | Path, kind: str, *, overwrite: bool = False, sources: Iterable = (),
                 protected: Iterable = (), key: str = "OUT") -> Path:
    """Refuse (:class:`OutputRefused`, naming ``key``) an output folder whose writing could lose
    anything; return it resolved. ``sources``: folders read by the command (OUT may be neither
    equal to, inside nor above one); ``protected``: other folders of the run (OUT may be neither
    equal to nor above one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(out).expanduser().resolve()
    for source in sources:
        if source is not None and _related(out, Path(source).expanduser().resolve()):
            raise OutputRefused(f"{key}: {out} is, holds or lies inside the source {source}: choose a folder "
                                f"outside it", key=key)
    for folder in protected:
        if folder is None:
            continue
        folder = Path(folder).expanduser().resolve()
        if out == folder or out in folder.parents:
            raise OutputRefused(f"{key}: {out} is or holds {folder}, which this run writes too: replacing {out} "
                                f"would delete it; choose another folder", key=key)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise OutputRefused(f"{key}: {out} exists and is not a folder: nothing was written", key=key)
        if any(out.iterdir()):
            found = output_kind(out)
            if found is None:
                raise OutputRefused(f"{key}: {out} exists, is not empty and was not written by megatron-ivr (no "
                                    f"{MARKER}; outputs of releases before 2026-12 have none): it is left as it "
                                    f"is; move it aside yourself or choose a new folder", key=key)
            if found != kind:
                raise OutputRefused(f"{key}: {out} holds a {found} output, not a {kind} one: it is left as it is",
                                    key=key)
            if not overwrite:
                raise OutputRefused(f"{key}: {out} holds an earlier {kind} output; pass --overwrite to replace it",
                                    key=key)
    return out


def staging_dir(out: str | Path) -> Path:
    """A fresh, uniquely named hidden sibling of ``out`` to write into (created here)."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))


def discard(staging: Path) -> None:
    """Remove a staging folder made by :func:`staging_dir` (and only such a folder)."""
    if staging.name.endswith(".partial") and staging.name.startswith("."):
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: str | Path, kind: str, *, overwrite: bool = False, key: str = "OUT") -> Path:
    """Mark ``staging`` as a ``kind`` output and move it to ``out``: the old output (checked
    again here) is renamed aside, the new one renamed in, then the old one deleted."""
    try:
        out = check_output(out, kind, overwrite=overwrite, key=key)
    except OutputRefused as exc:
        raise OutputRefused(f"{exc}; the finished output is kept in {staging}", key=key) from None
    (staging / MARKER).write_text(json.dumps({"kind": kind, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old output
    else:
        aside = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, aside)
        os.replace(staging, out)
        shutil.rmtree(aside, ignore_errors=True)
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where the
    system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0

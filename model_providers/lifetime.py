"""Processes that end with their parent: a rank whose ``torchrun`` agent was SIGKILLed, a
converter rank whose parent died, megatron-core's checkpoint-writer manager. Without this
they keep running (and writing: steps, FINISHED, an export) with no one to report to.

Linux's ``prctl(PR_SET_PDEATHSIG)`` has the kernel send a signal to this process when the
thread that started it exits. It is not inherited across ``fork`` and survives ``exec``.
Where it is unavailable (other systems) nothing is set and :func:`exit_with_parent` says so.
Deliberately light (no torch): the spawned checkpoint-writer manager imports it.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def exit_with_parent(expected_parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (SIGKILL by default:
    checkpoints are atomic, so a run resumes from its newest one). ``expected_parent``: the
    parent's pid, to catch a parent that died before this call. False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)  # the parent is already gone
    return True


def under_torchrun() -> bool:
    """This process is a worker started by torchrun's elastic agent (its parent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def manager_initializer() -> None:
    """For megatron-core's checkpoint-writer manager (a spawned server process): survive the
    SIGTERM that Slurm sends before a time limit (the save it asks for needs the manager), and
    end with the rank that started it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()

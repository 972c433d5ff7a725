"""A process pool whose every call is bounded in time.

``concurrent.futures`` cannot stop a running call, and math-verify's own limits rely on
``signal.alarm`` (main thread only), so grading runs here: each worker is a spawned
process that runs calls in its main thread. A call still running after ``timeout_s`` has
its worker killed and replaced, and yields ``default``; so does a call whose worker dies.
A pathological answer therefore costs at most ``timeout_s`` of one worker, never a hang.
A worker that died while idle (killed by the OOM killer, say) is replaced when a call finds
it, and the call goes to the next ready worker.

A worker's start (interpreter, imports, the optional ``warmup``) is not counted against any
call: a worker announces itself when ready, and calls go only to ready workers. Counting it
made a loaded machine's fresh workers miss their first call, get replaced, and miss again.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any, Optional

_READY = "ready"
MAX_FAILED_STARTS = 3  # consecutive worker deaths before announcing themselves: the warm-up is broken


def _worker_loop(fn: Callable, conn, warmup: Optional[Callable] = None) -> None:
    if warmup is not None:
        warmup()
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        index, args = message
        try:
            result = fn(*args)
        except Exception:  # a failing call is an ungradable answer, not a dead worker
            result = None
        conn.send((index, result))


class TimeLimitedPool:
    def __init__(self, fn: Callable, num_workers: int = 1, timeout_s: float = 5.0, default: Any = 0.0,
                 warmup: Optional[Callable] = None, startup_timeout_s: float = 300.0):
        """``warmup`` runs once in each worker before it takes calls (slow imports);
        ``startup_timeout_s`` bounds a worker's start (then :meth:`map` raises)."""
        self.fn, self.timeout_s, self.default, self.warmup = fn, timeout_s, default, warmup
        self.startup_timeout_s = startup_timeout_s
        self._ctx = mp.get_context("spawn")
        self._workers: list = [self._spawn() for _ in range(num_workers)]
        self._starting: dict[int, float] = {slot: time.monotonic() for slot in range(num_workers)}
        self.timeouts = 0  # calls cut off so far (a metric)
        self._failed_starts = 0

    def _spawn(self):
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_loop, args=(self.fn, child, self.warmup), daemon=True)
        process.start()
        child.close()
        return process, parent

    def _replace(self, slot: int) -> None:
        process, conn = self._workers[slot]
        process.kill()
        process.join(timeout=5)
        conn.close()
        self._workers[slot] = self._spawn()
        self._starting[slot] = time.monotonic()

    def _started(self, slot: int, ready: list) -> bool:
        """Whether the starting worker in ``slot`` has announced itself. One that died first (killed
        from outside) is replaced; raises when starts keep failing (a broken warm-up) or take
        longer than the limit."""
        conn = self._workers[slot][1]
        if conn in ready:
            try:
                if conn.recv() == _READY:
                    del self._starting[slot]
                    self._failed_starts = 0
                    return True
            except (EOFError, OSError):
                pass
            self._failed_starts += 1
            if self._failed_starts >= MAX_FAILED_STARTS:
                raise RuntimeError(f"a grading worker died while starting, {self._failed_starts} times in a row "
                                   f"(exit code {self._workers[slot][0].exitcode})")
            self._replace(slot)
            return False
        if time.monotonic() - self._starting[slot] > self.startup_timeout_s:
            raise RuntimeError(f"a grading worker did not start within {self.startup_timeout_s:.0f} s")
        return False

    def map(self, calls: Sequence[tuple]) -> list:
        """Run ``fn(*args)`` for each ``args`` in ``calls``; results keep the input order."""
        results: list = [self.default] * len(calls)
        pending = deque(enumerate(calls))
        idle = [slot for slot in range(len(self._workers)) if slot not in self._starting]
        busy: dict[int, tuple[int, float]] = {}  # slot -> (call index, start time)
        while pending or busy:
            while pending and idle:
                slot = idle.pop()
                index, args = pending.popleft()
                try:
                    self._workers[slot][1].send((index, tuple(args)))
                except (BrokenPipeError, ConnectionResetError, EOFError, OSError):  # it died while idle
                    pending.appendleft((index, args))
                    self._replace(slot)
                    continue
                busy[slot] = (index, time.monotonic())
            now = time.monotonic()
            deadlines = [start + self.timeout_s for _, start in busy.values()]
            deadlines += [start + self.startup_timeout_s for start in self._starting.values()] if pending else []
            wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
            watched = list(busy) + (list(self._starting) if pending else [])
            ready = wait([self._workers[s][1] for s in watched], timeout=wait_s)
            if pending:
                idle += [slot for slot in list(self._starting) if self._started(slot, ready)]
            for slot in list(busy):
                conn = self._workers[slot][1]
                index, start = busy[slot]
                if conn in ready:
                    try:
                        got_index, value = conn.recv()
                        results[got_index] = self.default if value is None else value
                    except (EOFError, OSError):  # the worker died mid-call
                        self._replace(slot)
                elif time.monotonic() - start >= self.timeout_s:
                    self.timeouts += 1
                    self._replace(slot)
                else:
                    continue
                del busy[slot]
                if slot not in self._starting:  # a replaced worker takes calls once it announces itself
                    idle.append(slot)
        return results

    def close(self) -> None:
        for process, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
            process.join(timeout=2)
            if process.is_alive():
                process.kill()
            conn.close()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Start, watch and stop ``sglang.launch_server`` processes (or attach to running ones).

Servers bind to 127.0.0.1 unless told otherwise. The multimodal embedding cache is
disabled (``SGLANG_VLM_CACHE_SIZE_MB=0``): it is keyed by image hash and survives weight
updates, so a vision-tower update would otherwise be silently ignored for images seen
before. The preprocessing cache (pixels and grids, no weights) is on: with it SGLang builds a
Qwen2.5-VL prompt from token ids as given, which a partial rollout needs (sglang/engine.py).
On CPU the CPU engine and its flags are used (docs/rollout.md).
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# The API key never travels in argv (``ps`` shows every user a process's arguments): a server
# with a key is started through this bootstrap, which takes the key from API_KEY_ENV (removing
# it from the environment its children inherit), appends ``--api-key`` to its own ``sys.argv``
# (the process's visible command line stays without it) and runs ``sglang.launch_server``.
# It runs in the SGLang environment, which need not have megatron-ivr installed: plain Python.
API_KEY_ENV = "MEGATRON_IVR_API_KEY"
SERVER_BOOTSTRAP = ("import os, runpy, sys; key = os.environ.pop('" + API_KEY_ENV + "'); "
                    "sys.argv = ['sglang.launch_server', *sys.argv[1:], '--api-key', key]; "
                    "runpy.run_module('sglang.launch_server', run_name='__main__', alter_sys=True)")

# content-addressed image preprocessing (no weights in it): the path that keeps given token ids
PREPROCESS_CACHE_FLAGS = ["--mm-preprocess-cache-size-mb", "64"]
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--mm-attention-backend", "sdpa",
             "--disable-cuda-graph", "--disable-overlap-schedule"]


@dataclass
class ServerSpec:
    model_path: str
    port: int
    host: str = "127.0.0.1"
    device: str = "cpu"
    api_key: Optional[str] = None
    max_total_tokens: Optional[int] = 8192  # None: SGLang sizes the KV cache from GPU memory
    extra_args: list[str] = field(default_factory=list)
    python: str = sys.executable  # the SGLang environment's interpreter
    log_path: Optional[str] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self, with_api_key: Optional[bool] = None) -> list[str]:
        """The server's command line; with an API key (``with_api_key``, default: this spec has
        one) it starts through :data:`SERVER_BOOTSTRAP`, the key in the environment, not here."""
        with_api_key = bool(self.api_key) if with_api_key is None else with_api_key
        start = ["-c", SERVER_BOOTSTRAP] if with_api_key else ["-m", "sglang.launch_server"]
        args = [self.python, *start, "--model-path", self.model_path, "--host", self.host,
                "--port", str(self.port), "--dtype", "float32" if self.device == "cpu" else "auto"]
        if self.max_total_tokens is not None:
            args += ["--max-total-tokens", str(self.max_total_tokens)]
        if self.device == "cpu":
            args += CPU_FLAGS
        return args + PREPROCESS_CACHE_FLAGS + list(self.extra_args)

    def env_overrides(self) -> dict:
        """What a server needs on top of its environment (the launch scripts export the same):
        the multimodal cache off; log-probs of the tempered distribution the tokens were
        sampled from (SGLang's default, which the trainer scores: an inherited
        ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` would report raw-logit log-probs and skew TIS at
        T != 1); and the CPU engine on CPU."""
        env = {"SGLANG_VLM_CACHE_SIZE_MB": "0", "SGLANG_RETURN_ORIGINAL_LOGPROB": "0"}
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
        return env

    def environment(self) -> dict:
        env = dict(os.environ, **self.env_overrides())
        if self.api_key:
            env[API_KEY_ENV] = self.api_key
        if self.device == "cpu":
            env.setdefault("OMP_NUM_THREADS", "1")
        return env


class ServerManager:
    """Owns SGLang server processes: start, wait until they generate, restart dead ones
    (``watch``), and stop them all on exit."""

    def __init__(self, specs: list[ServerSpec], startup_timeout_s: float = 600.0):
        self.specs = specs
        self.startup_timeout_s = startup_timeout_s
        self.processes: dict[int, subprocess.Popen] = {}
        self.restarts = 0
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        atexit.register(self.shutdown)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.specs]

    def _start(self, index: int) -> None:
        spec = self.specs[index]
        log = open(spec.log_path, "ab") if spec.log_path else subprocess.DEVNULL
        self.processes[index] = subprocess.Popen(spec.command(), env=spec.environment(), stdout=log,
                                                 stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> ServerManager:
        for index in range(len(self.specs)):
            self._start(index)
        for index in range(len(self.specs)):
            self.wait_ready(index)
        return self

    def wait_ready(self, index: int) -> None:
        spec, deadline = self.specs[index], time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            process = self.processes.get(index)
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"SGLang server {spec.url} exited with {process.returncode} while starting "
                                   f"(log: {spec.log_path})")
            if probe(spec.url + "/health_generate", spec.api_key):
                return
            time.sleep(2.0)
        raise TimeoutError(f"SGLang server {spec.url} not ready after {self.startup_timeout_s:.0f}s")

    def kill(self, index: int) -> None:
        """Kill one server (tests use this to simulate a crash)."""
        process = self.processes[index]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def restart_dead(self) -> int:
        restarted = 0
        for index, process in list(self.processes.items()):
            if process.poll() is not None:
                self._start(index)
                self.wait_ready(index)
                self.restarts += 1
                restarted += 1
        return restarted

    def watch(self, interval_s: float = 5.0) -> None:
        """Restart dead servers in a background thread until :meth:`shutdown`."""
        def loop():
            while not self._stop.wait(interval_s):
                self.restart_dead()
        self._watcher = threading.Thread(target=loop, name="sglang-watch", daemon=True)
        self._watcher.start()

    def shutdown(self) -> None:
        self._stop.set()
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.processes.clear()


# SGLang's default port and up, below Linux's default ephemeral range (32768-60999)
SERVER_PORTS = range(30000, 32768)


def free_server_port(ports: range = SERVER_PORTS) -> int:
    """A port for an SGLang server's HTTP endpoint that nothing holds now, outside the
    ephemeral range. A port from ``bind(0)`` is ephemeral: until the server binds it, any
    ``bind(0)`` on the machine may get it again, SGLang's own internal sockets included (a CI
    run lost 600 s to a server whose port its own scheduler had taken: uvicorn could not bind,
    and the health probe met a socket that does not speak HTTP)."""
    start = random.randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(start + offset) % len(ports)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1} for an SGLang server")


def probe(url: str, api_key: Optional[str] = None, timeout_s: float = 5.0) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def sglang_python(root: Optional[Path] = None) -> Optional[str]:
    """The interpreter of the separate SGLang environment, if it exists."""
    candidates = [os.environ.get("SGLANG_PYTHON")]
    if root is not None:
        candidates.append(str(root / ".venv-sglang" / "bin" / "python"))
    return next((c for c in candidates if c and Path(c).exists()), None)

"""Async HTTP client for SGLang 0.5.23 servers (and sglang-router for /generate).

- One aiohttp connection pool, bounded concurrency (a semaphore), a timeout per request.
- Every sample is its own request with a unique ``rid`` and its own result slot: a request
  whose server fails (connection error, 5xx, timeout) is retried on another server, up to
  ``retries`` times, so a sample is never lost and never counted twice.
- ``Authorization: Bearer <api_key>`` on every request when a key is set.
- Admin endpoints (pause, flush, weight updates, versions) go to every server: the router
  does not proxy them. A server that cannot be reached by one (its process died) is
  *retired*: the call goes on with the others, and the server gets no more requests in this
  run, since one that comes back serves its checkpoint's weights, not the policy's (a retired
  server rejoining after a full push is not built; with the ``distributed`` transport, whose
  broadcast group counts every server, a lost server stops the run, which then resumes).
  With ``router_url``, ``/generate`` goes through sglang-router (which spreads it over the
  workers) and admin calls go to the worker ``urls``.
The client runs its own event loop in a background thread so that synchronous trainer code
can call it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

logger = logging.getLogger(__name__)


class SGLangError(RuntimeError):
    """A server answered with an error, or every retry failed."""


@dataclass
class ServerState:
    url: str
    failures: int = 0
    down_until: float = 0.0
    retired: bool = False  # unreachable during an admin call: never used again (module docstring)

    def available(self) -> bool:
        return not self.retired and time.monotonic() >= self.down_until


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0
    failures: dict = field(default_factory=dict)
    retired: list = field(default_factory=list)  # the URLs of retired servers


class SGLangClient:
    def __init__(self, urls: list[str], api_key: Optional[str] = None, max_concurrency: int = 64,
                 timeout_s: float = 600.0, retries: int = 3, cool_off_s: float = 5.0,
                 router_url: Optional[str] = None):
        if not urls:
            raise ValueError("SGLangClient needs at least one server URL")
        self.servers = [ServerState(u.rstrip("/")) for u in urls]
        self.generate_targets = [ServerState(router_url.rstrip("/"))] if router_url else self.servers
        self.api_key, self.timeout_s, self.retries, self.cool_off_s = api_key, timeout_s, retries, cool_off_s
        self.max_concurrency = max_concurrency
        self.stats = ClientStats()
        self._rr = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        self._session: Optional[aiohttp.ClientSession] = None
        self._semaphore: Optional[asyncio.Semaphore] = None
        self.run(self._open())

    # --- event loop plumbing ------------------------------------------------------------
    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_concurrency),
            headers={"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        self._semaphore = asyncio.Semaphore(self.max_concurrency)

    def run(self, coroutine):
        """Run a coroutine on the client's loop from synchronous code and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def close(self) -> None:
        if self._session is not None:
            self.run(self._session.close())
            self._session = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # --- requests -------------------------------------------------------------------------
    def _pick(self, exclude: set[str]) -> ServerState:
        targets = [s for s in self.generate_targets if not s.retired] or self.generate_targets
        candidates = [s for s in targets if s.available() and s.url not in exclude]
        if not candidates:
            candidates = [s for s in targets if s.url not in exclude] or targets
        return candidates[next(self._rr) % len(candidates)]

    async def _post(self, url: str, path: str, payload: Optional[dict], timeout_s: Optional[float] = None,
                    method: str = "POST") -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        async with self._semaphore:
            async with self._session.request(method, url + path, json=payload, timeout=timeout) as response:
                text = await response.text()
                if response.status >= 400:
                    raise SGLangError(f"{url}{path}: HTTP {response.status}: {text[:500]}")
                if not text:
                    return None
                try:
                    return json.loads(text)
                except ValueError:  # some admin endpoints answer plain text (e.g. /flush_cache)
                    return text

    async def generate_one(self, payload: dict) -> dict:
        """POST /generate with retries on other servers; returns the single result object."""
        tried: set[str] = set()
        last_error: Optional[Exception] = None
        for attempt in range(self.retries + 1):
            server = self._pick(tried)
            tried.add(server.url)
            self.stats.requests += 1
            try:
                result = await self._post(server.url, "/generate", payload)
                server.failures = 0
                return result[0] if isinstance(result, list) else result
            except (aiohttp.ClientError, asyncio.TimeoutError, SGLangError) as exc:
                if isinstance(exc, SGLangError) and " HTTP 4" in str(exc):
                    raise  # the request itself is wrong: retrying elsewhere will not help
                last_error = exc
                server.failures += 1
                server.down_until = time.monotonic() + self.cool_off_s
                self.stats.failures[server.url] = self.stats.failures.get(server.url, 0) + 1
                if attempt < self.retries:
                    self.stats.retries += 1
                    if len(tried) == len(self.generate_targets):
                        tried.clear()  # every server failed once: wait, then try them again
                        await asyncio.sleep(min(self.cool_off_s, 2.0 * (attempt + 1)))
        raise SGLangError(f"/generate failed after {self.retries + 1} attempts: {last_error}")

    def generate(self, payloads: list[dict]) -> list[dict]:
        async def gather():
            return await asyncio.gather(*(self.generate_one(p) for p in payloads))
        return self.run(gather())

    def call_all(self, path: str, payload: Optional[dict] = None, method: str = "POST",
                 timeout_s: Optional[float] = None) -> list[Any]:
        """Send an admin request to every server in service; raise if any answers with an error.
        One that cannot be reached is retired (module docstring), unless it is the last."""
        serving = [s for s in self.servers if not s.retired]
        if not serving:
            raise SGLangError(f"{path}: every rollout server was lost ({', '.join(self.stats.retired)})")

        async def gather():
            return await asyncio.gather(*(self._post(s.url, path, payload, timeout_s, method) for s in serving),
                                        return_exceptions=True)
        results = self.run(gather())
        for server, result in zip(serving, results):
            if isinstance(result, aiohttp.ClientConnectionError) and len(serving) > 1:
                server.retired = True
                self.stats.retired.append(server.url)
                logger.warning("rollout server %s is unreachable (%s): retired; the run goes on with %d server(s)",
                               server.url, result, len([s for s in self.servers if not s.retired]))
            elif isinstance(result, BaseException):
                raise result if isinstance(result, SGLangError) else SGLangError(f"{server.url}{path}: {result}")
            elif isinstance(result, dict) and result.get("success") is False:
                raise SGLangError(f"{server.url}{path}: {result.get('message')}")
        return [r for server, r in zip(serving, results) if not server.retired]

    def healthy(self, path: str = "/health_generate", timeout_s: float = 5.0) -> list[bool]:
        async def probe(server):
            try:
                await self._post(server.url, path, None, timeout_s, method="GET")
                return True
            except (aiohttp.ClientError, asyncio.TimeoutError, SGLangError):
                return False

        async def gather():
            return await asyncio.gather(*(probe(s) for s in self.servers))
        return self.run(gather())

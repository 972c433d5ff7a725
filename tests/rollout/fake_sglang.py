"""A local HTTP server that speaks SGLang 0.5.23's JSON for the endpoints the trainer uses
(a unit-test double: the integration tier runs the real server). It records every request,
requires begin/end around tensor updates (400 otherwise, like SGLang), returns a flat list
for batches, honours an API key, and can be told to fail or hang."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class FakeSGLang:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.requests: list[tuple[str, dict]] = []
        self.in_update = False
        self.version = "default"
        self.fail_generate = 0  # the next N /generate calls answer 500
        self.hang_generate = False
        self.device = "cuda"  # what /server_info reports
        self.port = None
        self._loop = asyncio.new_event_loop()
        self._runner = None

    # --- handlers --------------------------------------------------------------------
    def _auth(self, request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def handle(self, request: web.Request) -> web.Response:
        if not self._auth(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        path = request.path
        body = await request.json() if request.can_read_body else {}
        self.requests.append((path, body))
        if path == "/generate":
            if self.hang_generate:
                await asyncio.sleep(5)  # longer than the client's timeout in the test
            if self.fail_generate > 0:
                self.fail_generate -= 1
                return web.json_response({"error": "boom"}, status=500)
            texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
            results = [self._result(t, body) for t in texts]
            return web.json_response(results if isinstance(body["text"], list) else results[0])
        if path == "/begin_weight_update":
            self.in_update = True
        elif path == "/end_weight_update":
            self.in_update = False
        elif path == "/update_weights_from_tensor" and not self.in_update:
            return web.json_response({"success": False, "message": "not inside begin/end"}, status=400)
        elif path == "/update_weight_version":
            self.version = body["new_version"]
        return web.json_response({"success": True, "message": "ok"})

    def _result(self, text: str, body: dict) -> dict:
        n = body["sampling_params"]["max_new_tokens"]
        tokens = [[-0.5, 10 + i, "x"] for i in range(n)]
        return {"text": f"echo:{len(text)}", "meta_info": {"output_token_logprobs": tokens,
                                                           "finish_reason": {"type": "length", "length": n},
                                                           "weight_version": self.version, "id": body.get("rid")}}

    async def health(self, request):
        return web.Response(text="ok")

    async def server_info(self, request):
        if not self._auth(request):
            return web.json_response({"error": "unauthorized"}, status=401)
        return web.json_response({"device": self.device, "tp_size": 1})

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> FakeSGLang:
        ready = threading.Event()

        async def boot():
            app = web.Application()
            app.router.add_get("/health", self.health)
            app.router.add_get("/health_generate", self.health)
            app.router.add_get("/server_info", self.server_info)
            app.router.add_post("/{tail:.*}", self.handle)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(boot(), self._loop)
        ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

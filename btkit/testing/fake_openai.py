"""A deterministic OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks of whole runs.

The reply is a function of the request alone (its messages and sampling parameters), so two runs
that send the same requests get the same replies, whichever process, shard or order sends them:
a sharded run and a one-process run of the same input must then produce the same data. A prompt
that asks for a score (it contains ``Score``) gets ``Score: N`` with N from 1 to 5 taken from the
request's hash (so a keep-top cut has something to cut); any other prompt gets a short question.
Every request is logged with the time it arrived and the time its answer was sent
(:attr:`FakeOpenAIServer.requests`), which is how a test counts requests sent twice.

``latency`` seconds pass before each answer (an ``asyncio.sleep``: a slow model, not a busy
server; hundreds of requests wait at once). In a test, :meth:`FakeOpenAIServer.start` runs it on
its own event loop in a thread; for a benchmark, run it as a process so it takes no CPU from the
process measured::

    python -m btkit.testing.fake_openai --latency 0.1 --port-file /tmp/port
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

WORDS = ("river stone cloud market engine garden letter window signal harbor forest lantern copper meadow "
         "quartz ribbon").split()


def request_digest(body: dict[str, Any]) -> str:
    """What identifies a request: its messages and every sampling parameter (not the model name)."""
    keyed = {k: v for k, v in body.items() if k not in ("model", "stream")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def reply_text(body: dict[str, Any]) -> str:
    """The deterministic answer to a chat request (see the module docstring)."""
    digest = request_digest(body)
    number = int(digest[:8], 16)
    last_user = next((str(m.get("content", "")) for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    if "Score" in last_user:
        return f"The answer follows the instruction.\nScore: {1 + number % 5}"
    words = [WORDS[(number >> (4 * i)) % len(WORDS)] for i in range(4)]
    return f"What does the passage say about the {words[0]} {words[1]} and the {words[2]} {words[3]}?"


@dataclass
class Request:
    """One chat request as the server saw it."""

    digest: str
    received: float
    answered: float | None = None


@dataclass
class FakeOpenAIServer:
    latency: float = 0.0
    model: str = "fake-model"
    port: int = 0
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        seen = Request(request_digest(body), time.time())
        self.requests.append(seen)
        if self.latency:
            await asyncio.sleep(self.latency)
        text = reply_text(body)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        seen.answered = time.time()
        return web.json_response({
            "id": "chatcmpl-" + seen.digest[:12], "object": "chat.completion", "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split())},
        })

    def counts(self) -> dict[str, int]:
        """How many times each distinct request arrived."""
        out: dict[str, int] = {}
        for r in self.requests:
            out[r.digest] = out.get(r.digest, 0) + 1
        return out

    def reset(self) -> None:
        self.requests.clear()

    # -- in a thread (tests) --------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self.app(), shutdown_timeout=0.5, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


__all__ = ["FakeOpenAIServer", "Request", "main", "reply_text", "request_digest"]


def main() -> None:
    """Serve until killed; the port is written to ``--port-file`` once the server listens."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency, port=args.port)

    async def serve() -> None:
        runner = web.AppRunner(server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
        while True:
            await asyncio.sleep(3600)

    asyncio.run(serve())


if __name__ == "__main__":
    main()

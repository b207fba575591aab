"""A fault-injecting OpenAI-compatible server on 127.0.0.1, for the remote-backend tests.

Runs an aiohttp web app on its own event loop in a thread. What it does to a chat request is
written in the request itself, by a marker in the corpus text that reaches the prompt:
``[[fault=KIND times=N id=ID]]`` applies KIND to the first N requests of that stage for ID (no
``times``: every request), then answers normally. Stages are told apart by the prompt: a Humpback
curate prompt quotes ``<<<INSTRUCTION``; faults apply to the augment stage unless ``stage=curate``.

KINDs: ``http429`` (Retry-After: ``ra`` seconds, default 1), ``http500``, ``http400``, ``hang``
(sleeps ``hang_s`` before answering), ``drop`` (closes the connection without a reply), ``badjson``
(200 with a body that is not JSON), ``length`` (finish_reason=length), ``content_filter``,
``echokey`` (400 whose body repeats the Authorization header, as some providers do), ``http401``,
``slow`` (answers normally after ``hang_s``: for counting requests in flight, ``max_slow_in_flight``),
``barrier`` (holds each request until ``n`` of them are open at once, or ``hang_s`` passed, then
answers: the peak is ``max_slow_in_flight``; a client that cannot open ``n`` connections shows a
lower peak, after a bounded wait), ``echoreply`` (a normal 200 whose text quotes the Authorization
header, every choice of it).
Malformed 200 replies (:data:`MALFORMED`): ``nochoices`` (an empty ``choices`` list), ``strmessage``
(``message`` is a string), ``numcontent`` (``content`` is a number), ``partcontent`` (``content`` is
a list of text parts that spell the normal answer), ``strusage`` / ``nanusage`` (``usage`` is a
string / NaN), ``nancounts`` (``usage`` counts NaN and a string); the last three carry a normal answer.

Normal answers: augment -> an instruction naming the id; curate -> ``Score: 5`` (or logprobs when
asked, vLLM-style). ``GET /v1/models`` lists one model, ``owned_by`` = ``owner`` (``vllm`` makes the
backend trust vLLM's extensions). Any other path answers 404. Every request is logged in ``requests``
for assertions (other paths too, as stage ``unknown``).

``POST /v1/completions`` answers as ``completions_mode`` says: ``echo`` (OpenAI-style echoed prompt
logprobs: one token per whitespace-led word, logprob -(characters)/10, each its own top token, plus
one generated token ``" x"``), ``shifted`` (the same numbers, but each position's top token is the
*next* token: logprobs read one position late), ``nologprobs`` (200 without logprobs), ``reject``
(400: echo with logprobs not supported), ``logits`` (500 naming logprobs, as llama-cpp-python's
server started without ``--logits_all True``).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

#: Fault kinds that answer 200 with a reply of the wrong shape (see :meth:`FaultServer.malformed`).
MALFORMED = ("nochoices", "strmessage", "numcontent", "partcontent", "strusage", "nanusage", "nancounts")

MARKER = re.compile(r"\[\[fault=(\w+)((?:\s+\w+=[\w.]+)*)\]\]")


@dataclass
class Seen:
    """One request as the server saw it."""

    t: float
    path: str
    stage: str
    fault: str | None
    fault_id: str | None
    authorization: str | None
    body: dict[str, Any]
    action: str


@dataclass
class FaultServer:
    owner: str = "fake"
    model: str = "fake-model"
    hang_s: float = 3.0
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    completions_mode: str = "echo"

    def __post_init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.slow_in_flight = 0
        self.max_slow_in_flight = 0
        self._barriers: dict[str, asyncio.Event] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FaultServer":
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_get("/v1/models", self.models)
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_route("*", "/{tail:.*}", self.unknown)
            self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=1024)  # hundreds of clients connect at once
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="fault-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in pending:  # handlers still sleeping for a client that gave up
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self.requests.clear()
            self.max_slow_in_flight = 0
            self.slow_in_flight = 0
            self._barriers.clear()
        self.completions_mode = "echo"

    def seen(self, fault_id: str, stage: str = "augment") -> list[Seen]:
        return [r for r in self.requests if r.fault_id == fault_id and r.stage == stage]

    # -- handlers ---------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": self.owner}]})

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        """Any other path: logged (a test can see a request that went where it should not), then 404."""
        self.requests.append(Seen(time.time(), request.path, "unknown", None, None, request.headers.get("Authorization"), {}, "404"))
        return web.json_response({"error": {"message": f"no route {request.method} {request.path}"}}, status=404)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = str(body.get("prompt", ""))
        mode = self.completions_mode
        self.requests.append(Seen(time.time(), "/v1/completions", "completions", None, None, request.headers.get("Authorization"), body, mode))
        if mode == "reject":
            return web.json_response({"error": {"message": "echo is not supported with logprobs for this model", "type": "invalid_request_error"}}, status=400)
        if mode == "logits":
            return web.json_response({"error": {"message": "logprobs is not supported for models created with logits_all=False"}}, status=500)
        reply: dict[str, Any] = {
            "id": "cmpl-1", "object": "text_completion", "model": body.get("model", self.model),
            "choices": [{"index": 0, "text": (prompt if body.get("echo") else "") + " x", "finish_reason": "length", "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 1},
        }
        if mode in ("echo", "shifted") and body.get("echo") and body.get("logprobs") is not None:
            reply["choices"][0]["logprobs"] = _echo_logprobs(prompt + " x", shifted=mode == "shifted")
        return web.json_response(reply)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        last_user = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        stage = "curate" if "<<<INSTRUCTION" in last_user else "augment"
        m = MARKER.search(last_user)
        fault = fault_id = None
        opts: dict[str, str] = {}
        if m:
            fault = m.group(1)
            opts = dict(kv.split("=", 1) for kv in m.group(2).split())
            fault_id = opts.get("id", fault)
        action = "ok"
        if fault and stage == opts.get("stage", "augment"):
            with self._lock:
                key = (fault_id or "", stage)
                self._counts[key] = self._counts.get(key, 0) + 1
                n = self._counts[key]
            times = int(opts["times"]) if "times" in opts else None
            if times is None or n <= times:
                action = fault
        self.requests.append(Seen(time.time(), "/v1/chat/completions", stage, fault, fault_id, request.headers.get("Authorization"), body, action))
        if action not in ("slow", "barrier"):
            return await self.respond(request, body, stage, action, fault_id, opts, text)
        self.slow_in_flight += 1
        self.max_slow_in_flight = max(self.max_slow_in_flight, self.slow_in_flight)
        try:
            if action == "barrier":
                n = int(opts.get("n", "1"))
                gate = self._barriers.setdefault(str(n), asyncio.Event())
                if self.slow_in_flight >= n:
                    gate.set()
                try:
                    await asyncio.wait_for(gate.wait(), float(opts.get("hang_s", self.hang_s)))
                except asyncio.TimeoutError:
                    pass  # bounded: a client that never opens n connections still gets its answers
            return await self.respond(request, body, stage, action, fault_id, opts, text)
        finally:
            self.slow_in_flight -= 1

    async def respond(self, request: web.Request, body: dict[str, Any], stage: str, action: str, fault_id: str | None,
                      opts: dict[str, str], text: str) -> web.StreamResponse:
        if action == "http429":
            return web.json_response({"error": {"message": "rate limited", "type": "rate_limit"}}, status=429, headers={"Retry-After": opts.get("ra", "1")})
        if action == "http500":
            return web.json_response({"error": {"message": f"internal failure for {fault_id}"}}, status=500)
        if action == "http400":
            return web.json_response({"error": {"message": f"bad request for {fault_id}"}}, status=400)
        if action == "http401":
            return web.json_response({"error": {"message": f"Incorrect API key provided: {request.headers.get('Authorization')}"}}, status=401)
        if action == "echokey":
            return web.json_response({"error": {"message": f"rejected request with header {request.headers.get('Authorization')}"}}, status=400)
        if action in ("hang", "slow"):
            await asyncio.sleep(float(opts.get("hang_s", self.hang_s)))
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=200)
        if action == "badjson":
            return web.Response(status=200, text='{"id": "chatcmpl-x", "choices": [{"message": {"content": "trunc', content_type="application/json")
        if body.get("prompt_logprobs") is not None:
            cont = body["messages"][-1]["content"]
            return web.json_response({**self.reply(body, "x", "length"), "prompt_logprobs": [None] + _prompt_logprobs(text[:-len(cont)] if cont else text, bos=False) + _prompt_logprobs(cont, bos=False)})
        if body.get("logprobs") and body.get("max_tokens") == 1:
            return web.json_response(self.logprob_reply(body))
        finish = {"length": "length", "content_filter": "content_filter"}.get(action, "stop")
        if action == "content_filter":
            content = None
        elif stage == "augment":
            content = f"Explain how the item {fault_id or 'plain'} works in practice."
        else:
            content = "The answer is complete and helpful.\nScore: 5"
        if action == "echoreply":
            content = f"{content} (asked with {request.headers.get('Authorization')})"
        if action in MALFORMED:
            return web.json_response(self.malformed(self.reply(body, content, finish), action))
        return web.json_response(self.reply(body, content, finish))

    @staticmethod
    def malformed(reply: dict[str, Any], action: str) -> dict[str, Any]:
        """A normal reply bent into one of the :data:`MALFORMED` shapes (NaN is written as JSON's ``NaN``)."""
        for choice in reply["choices"]:
            text = choice["message"]["content"]
            if action == "strmessage":
                choice["message"] = text
            elif action == "numcontent":
                choice["message"]["content"] = 42
            elif action == "partcontent":
                half = len(text) // 2
                choice["message"]["content"] = [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]
        if action == "nochoices":
            reply["choices"] = []
        elif action == "strusage":
            reply["usage"] = "lots of tokens"
        elif action == "nanusage":
            reply["usage"] = float("nan")
        elif action == "nancounts":
            reply["usage"] = {"prompt_tokens": float("nan"), "completion_tokens": "12", "total_tokens": -1}
        return reply

    def reply(self, body: dict[str, Any], content: str | None, finish: str) -> dict[str, Any]:
        n = int(body.get("n") or 1)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        return {
            "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body.get("model", self.model),
            "choices": [{"index": i, "message": {"role": "assistant", "content": content if n == 1 else f"{content} (choice {i})"},
                         "finish_reason": finish} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n * len((content or "").split()), "total_tokens": 0},
        }

    def logprob_reply(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM-shaped top_logprobs for one token: mostly '5', some ' 4' (a leading-space token)."""
        top = [{"token": "5", "logprob": -0.2}, {"token": " 4", "logprob": -2.0}, {"token": "4", "logprob": -3.0},
               {"token": "Great", "logprob": -4.0}, {"token": "3", "logprob": -6.0}]
        r = self.reply(body, "5", "length")
        r["choices"][0]["logprobs"] = {"content": [{"token": "5", "logprob": -0.2, "top_logprobs": top[: int(body.get("top_logprobs") or 5)]}]}
        return r


def _echo_logprobs(text: str, shifted: bool) -> dict[str, Any]:
    """OpenAI-style completions ``logprobs`` for ``text`` (the prompt and the generated token):
    one token per whitespace-led word, logprob -(characters)/10, the first token's null."""
    toks = re.findall(r"\s*\S+|\s+$", text)
    offsets, pos = [], 0
    for tok in toks:
        offsets.append(pos)
        pos += len(tok)
    values: list[Any] = [-len(t) / 10 for t in toks]
    tops: list[Any] = []
    for i, tok in enumerate(toks):
        top = {tok: values[i]}
        if shifted and i + 1 < len(toks):
            top = {toks[i + 1]: -0.01, **top}  # the most likely token is the one *after* this position
        tops.append(top)
    values[0] = tops[0] = None
    return {"tokens": toks, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops}


def _prompt_logprobs(text: str, bos: bool) -> list[Any]:
    """vLLM-shaped prompt_logprobs: one entry per whitespace-led word, logprob -(word length)/10."""
    toks = re.findall(r"\s*\S+|\s+$", text)
    entries: list[Any] = [None] if bos else []
    for i, tok in enumerate(toks):
        entries.append({str(1000 + i): {"logprob": -len(tok) / 10, "rank": 1, "decoded_token": tok}})
    return entries

"""Client-side throughput of btkit's remote backend against a fake OpenAI-compatible server.

The server runs in its own process (``--serve``), so client and server do not share an event loop;
they do share this machine's cores, so absolute rates are lower bounds and the ratios between rows
measured in the same run are what matters. Each cell: N chat requests at concurrency C.

- ``bare aiohttp``: one session, a semaphore, ``post`` + ``json()`` (the reference).
- ``btkit backend``: ``OpenAICompatBackend.chat`` under a semaphore, as the engine drives it.
- ``btkit engine``: a whole ``Run`` (journal, lineage, templates; cache off) with a one-stage method.

Zero latency: completions per second (btkit backend target >= 0.8x bare). 100 ms latency: wall
time / ideal, ideal = N x 0.1 s / C (target <= 1.10 at C=64, read as within a few percent of
bare's own ratio). Medians of ``--repeats`` runs; prints a markdown table.

    .venv/bin/python benchmarks/bench_client.py [--requests 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

REPLY = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A short instruction that a model might write."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51},
}).encode()
MESSAGES = [{"role": "system", "content": "You write requests."}, {"role": "user", "content": "Write the request that this answer responds to."}]


# -- server (its own process) ---------------------------------------------------------------
def serve(port: int) -> None:
    """``/lat<ms>/v1/chat/completions`` answers after <ms> milliseconds; ``/v1/models`` for readiness."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        ms = int(request.match_info["ms"])
        if ms:
            await asyncio.sleep(ms / 1000)
        return web.Response(body=REPLY, content_type="application/json")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "bench", "owned_by": "bench"}]})

    app = web.Application()
    app.router.add_post("/lat{ms}/v1/chat/completions", chat)
    app.router.add_get("/lat{ms}/v1/models", models)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, backlog=4096)


def start_server() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/lat0/v1/models", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("bench server did not start")


# -- clients --------------------------------------------------------------------------------
async def drive(n: int, concurrency: int, one: Callable[[], Awaitable[Any]]) -> None:
    """N calls, ``concurrency`` in flight, each under the shared semaphore as the engine bounds them.

    ``concurrency`` workers pull from one counter: no pile of N parked tasks, whose cost (Python
    3.11's Semaphore.acquire scans its waiters) would hide the clients' own differences.
    """
    sem = asyncio.Semaphore(concurrency)
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            async with sem:
                await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def bare_aiohttp(base_url: str, n: int, concurrency: int) -> float:
    import aiohttp

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> str:
            async with session.post(base_url + "/chat/completions", json={"model": "bench", "messages": MESSAGES, "max_tokens": 64}) as r:
                data = await r.json()
            return data["choices"][0]["message"]["content"]

        await drive(n, concurrency, one)
    return time.perf_counter() - t0


async def btkit_backend(base_url: str, n: int, concurrency: int) -> float:
    from btkit_plugins.backends.openai_compat import OpenAICompatBackend

    t0 = time.perf_counter()
    backend = OpenAICompatBackend("bench", {"base_url": base_url})
    await drive(n, concurrency, lambda: backend.chat(MESSAGES, {"max_tokens": 64}))
    await backend.aclose()
    return time.perf_counter() - t0


def btkit_engine(base_url: str, n: int, concurrency: int) -> float:
    """A whole run: one-stage method, cache off, journal and data written to a temp dir."""
    from btkit.config import RunConfig, StageSpec
    from btkit.engine import Run
    from btkit.plugins import Registry

    registry = Registry()
    registry.register(bench_plugin(), name="bench-method")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "in.jsonl"
        corpus.write_text("".join(json.dumps({"id": f"r{i}", "text": f"answer number {i}"}) + "\n" for i in range(n)))
        config = RunConfig(input=corpus, out_dir=Path(tmp) / "out", stages=[StageSpec("bench", "echo")], model="openai:bench",
                           backend_options={"base_url": base_url}, concurrency=concurrency, quiet=True, use_cache=False)
        t0 = time.perf_counter()
        stats = asyncio.run(Run(config, registry).execute())
        elapsed = time.perf_counter() - t0
    if stats["kept"] != n:
        raise SystemExit(f"engine run kept {stats['kept']} of {n}: {stats.get('dropped_by_reason')}")
    return elapsed


def bench_plugin() -> Any:
    """A plugin object with a trivial method: each input row is one unit, one chat call, kept."""
    import types

    from btkit.hookspecs import hookimpl
    from btkit.methods import Method, Stage, StageInfo
    from btkit.records import Record

    prompts = Path(tempfile.mkdtemp(prefix="btkit-bench-prompts-"))
    (prompts / "bench").mkdir()
    (prompts / "bench" / "echo.j2").write_text("{% block system %}You write requests.{% endblock %}{% block user %}{{ text }}{% endblock %}")

    class Echo(Stage):
        templates = ("bench/echo",)
        variables = ("text",)

        async def process(self, record: Record, ctx: Any) -> list[Record]:
            comp = await ctx.complete("bench/echo", {"text": record.fields["text"]}, max_tokens=64)
            record.fields.update(instruction=comp.text, response=record.fields["text"])
            return [record]

    class Bench(Method):
        def prepare(self, rows, options):
            for row in rows:
                yield Record(id=str(row["id"]), source_id=str(row["id"]), fields={"text": row["text"]})

        def build_stage(self, name, options):
            return Echo(self.name, name, options)

    @hookimpl
    def btkit_register_methods(register: Callable[..., None]) -> None:
        register(Bench(name="bench", description="benchmark", stages=[StageInfo("echo", "augment", ("text",), ("instruction",))],
                       default_stages=("echo",), prompts_dir=prompts))

    return types.SimpleNamespace(btkit_register_methods=btkit_register_methods)


CLIENTS: dict[str, Callable[[str, int, int], float]] = {
    "bare aiohttp": lambda url, n, c: asyncio.run(bare_aiohttp(url, n, c)),
    "btkit backend": lambda url, n, c: asyncio.run(btkit_backend(url, n, c)),
    "btkit engine": btkit_engine,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cells", default="0:64,0:256,100:64,100:256", help="latency_ms:concurrency pairs")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    cells = [tuple(int(x) for x in c.split(":")) for c in args.cells.split(",")]
    proc, port = start_server()
    results: dict[tuple[int, int, str], list[float]] = {}
    try:
        names = list(CLIENTS)
        for rep in range(args.repeats):  # interleaved, so drift in machine load hits every client alike
            order = names[rep % len(names):] + names[: rep % len(names)]  # and no client always goes first
            for ms, conc in cells:
                url = f"http://127.0.0.1:{port}/lat{ms}/v1"
                for name in order:
                    results.setdefault((ms, conc, name), []).append(CLIENTS[name](url, args.requests, conc))
    finally:
        proc.terminate()
        proc.wait(10)
    n = args.requests
    print(f"\n{n} chat requests per cell, median of {args.repeats}; server in its own process on 127.0.0.1\n")
    print("| latency | concurrency | client | wall s | completions/s | wall / ideal | vs bare aiohttp |")
    print("|---|---|---|---|---|---|---|")
    for ms, conc in cells:
        bare = statistics.median(results[(ms, conc, "bare aiohttp")])
        for name in CLIENTS:
            wall = statistics.median(results[(ms, conc, name)])
            ideal = n * ms / 1000 / conc
            ratio = f"{wall / ideal:.3f}" if ms else "-"
            versus = f"{bare / wall:.2f}x throughput" if not ms else f"{(wall / ideal) / (bare / ideal):.3f}x bare's ratio"
            print(f"| {ms} ms | {conc} | {name} | {wall:.2f} | {n / wall:,.0f} | {ratio} | {versus} |")


if __name__ == "__main__":
    main()

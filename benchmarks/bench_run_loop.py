"""CPU per record must not depend on reply order or latency (the run loop waits, it never spins).

Runs Humpback (augment + rubric curate) over N generated documents in this process against three
fake backends: replies at once, replies after a fixed 100 ms, and replies after 50-400 ms (so later
units routinely finish before the head of the reorder window). Prints the process CPU time per
record for each and its ratio to the instant run; a spinning loop shows up as a ratio well above 1.
Waiting itself is not free in asyncio (a timer and a loop wake-up per reply), so the same calls are
also made by a bare loop (a semaphore and ``gather``, no btkit) and btkit's own CPU per record is
the difference: that is the number that must not depend on reply order or latency.

    .venv/bin/python benchmarks/bench_run_loop.py --docs 300 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

from btkit.cli import cli
from btkit.plugins import get_registry
from btkit.testing.backends import DOUBLES_PLUGIN, Doubles, ScriptedBackend

VOCAB = "river stone cloud market engine garden letter window signal harbor forest lantern copper meadow quartz ribbon".split()


def reply(messages, params) -> str:
    return "Reasoning: fine.\nScore: 5" if "Score" in messages[-1]["content"] else "What does this passage explain?"


class DelayedBackend(ScriptedBackend):
    """Replies after ``low``..``high`` seconds (seeded), on the event loop (no threads)."""

    def __init__(self, low: float, high: float):
        super().__init__(default=reply)
        self.low, self.high, self.rng = low, high, random.Random(3)

    async def chat(self, messages, params):
        if self.high:
            await asyncio.sleep(self.rng.uniform(self.low, self.high))
        return await super().chat(messages, params)


WAKEUPS = [0]


def _count_wakeups() -> None:
    """Count event-loop iterations (``_run_once``): a spinning loop multiplies them, waiting does not."""
    import asyncio.base_events as base

    original = base.BaseEventLoop._run_once

    def counted(self):
        WAKEUPS[0] += 1
        return original(self)

    base.BaseEventLoop._run_once = counted


DOUBLES = Doubles()  # the test doubles are no production backends: this process registers them itself


def run_once(name: str, backend: ScriptedBackend, docs: int, concurrency: int) -> tuple[float, float]:
    registry = get_registry()
    if not registry.pm.has_plugin(DOUBLES_PLUGIN):
        registry.register(DOUBLES, name=DOUBLES_PLUGIN)
    DOUBLES.script(name, backend)
    with tempfile.TemporaryDirectory() as d:
        rng = random.Random(7)
        corpus = Path(d) / "c.jsonl"
        corpus.write_text("".join(
            '{"id": "doc%d", "text": "%s"}\n' % (i, " ".join(f"{rng.choice(VOCAB)}{rng.randint(0, 999)}" for _ in range(45)))
            for i in range(docs)))
        wall, cpu = time.monotonic(), time.process_time()
        result = CliRunner().invoke(cli, ["run", "humpback", str(corpus), "-o", str(Path(d) / "out"), "--model", backend.spec,
                                          "--judge-mode", "rubric", "--threshold", "1", "--no-cache", "-q",
                                          "--concurrency", str(concurrency)])
        if result.exit_code != 0:
            sys.exit(f"{name}: run failed: {result.output}")
        return time.process_time() - cpu, time.monotonic() - wall


def bare_once(backend: DelayedBackend, docs: int, concurrency: int) -> float:
    """CPU seconds for the same 2 x ``docs`` calls through a bare asyncio loop."""

    async def go() -> None:
        limit = asyncio.Semaphore(concurrency)
        messages = [{"role": "user", "content": "Write the request."}]

        async def one() -> None:
            async with limit:
                await backend.chat(messages, {})

        await asyncio.gather(*(one() for _ in range(2 * docs)))

    cpu = time.process_time()
    asyncio.run(go())
    return time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    _count_wakeups()
    kinds = {"instant": (0.0, 0.0), "100 ms": (0.1, 0.1), "50-400 ms, out of order": (0.05, 0.4)}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    bare: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    wakeups: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        for i, (kind, (low, high)) in enumerate(kinds.items()):
            WAKEUPS[0] = 0
            c, w = run_once(f"bench{r}-{i}", DelayedBackend(low, high), args.docs, args.concurrency)
            cpu[kind].append(1000 * c / args.docs)
            wall[kind].append(w)
            wakeups[kind].append(WAKEUPS[0] / args.docs)
            bare[kind].append(1000 * bare_once(DelayedBackend(low, high), args.docs, args.concurrency) / args.docs)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    own = {k: med[k] - statistics.median(bare[k]) for k in kinds}
    print(f"{args.docs} documents, concurrency {args.concurrency}, median of {args.repeats}")
    print(f"{'replies':<26} {'CPU ms/record':>14} {'bare loop':>10} {'btkit own':>10} {'own vs instant':>15} "
          f"{'loop wake-ups/record':>21} {'wall s':>8}")
    for kind in kinds:
        print(f"{kind:<26} {med[kind]:>14.2f} {statistics.median(bare[kind]):>10.2f} {own[kind]:>10.2f} "
              f"{own[kind] / own['instant']:>14.2f}x {statistics.median(wakeups[kind]):>21.1f} {statistics.median(wall[kind]):>8.1f}")


if __name__ == "__main__":
    main()

"""CPU per record must not depend on reply order or latency (the run loop waits, it never spins).

Runs Humpback (augment + rubric curate) over N generated documents in this process against three
fake backends: replies at once, replies after a fixed 100 ms, and replies after 50-400 ms (so later
units routinely finish before the head of the reorder window). Prints the process CPU time per
record for each and its ratio to the instant run; a spinning loop shows up as a ratio well above 1.

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
from btkit_plugins.testing import fake

VOCAB = "river stone cloud market engine garden letter window signal harbor forest lantern copper meadow quartz ribbon".split()


def reply(messages, params) -> str:
    return "Reasoning: fine.\nScore: 5" if "Score" in messages[-1]["content"] else "What does this passage explain?"


class DelayedBackend(fake.ScriptedBackend):
    """Replies after ``low``..``high`` seconds (seeded), on the event loop (no threads)."""

    def __init__(self, low: float, high: float):
        super().__init__(default=reply)
        self.low, self.high, self.rng = low, high, random.Random(3)

    async def chat(self, messages, params):
        if self.high:
            await asyncio.sleep(self.rng.uniform(self.low, self.high))
        return await super().chat(messages, params)


def run_once(name: str, backend: fake.ScriptedBackend, docs: int, concurrency: int) -> tuple[float, float]:
    fake.script(name, backend)
    with tempfile.TemporaryDirectory() as d:
        rng = random.Random(7)
        corpus = Path(d) / "c.jsonl"
        corpus.write_text("".join(
            '{"id": "doc%d", "text": "%s"}\n' % (i, " ".join(f"{rng.choice(VOCAB)}{rng.randint(0, 999)}" for _ in range(45)))
            for i in range(docs)))
        wall, cpu = time.monotonic(), time.process_time()
        result = CliRunner().invoke(cli, ["run", "humpback", str(corpus), "-o", str(Path(d) / "out"), "--model", backend.spec,
                                          "--curate-mode", "rubric", "--threshold", "1", "--no-cache", "-q",
                                          "--concurrency", str(concurrency)])
        if result.exit_code != 0:
            sys.exit(f"{name}: run failed: {result.output}")
        return time.process_time() - cpu, time.monotonic() - wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    kinds = {"instant": (0.0, 0.0), "100 ms": (0.1, 0.1), "50-400 ms, out of order": (0.05, 0.4)}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        for i, (kind, (low, high)) in enumerate(kinds.items()):
            c, w = run_once(f"bench{r}-{i}", DelayedBackend(low, high), args.docs, args.concurrency)
            cpu[kind].append(1000 * c / args.docs)
            wall[kind].append(w)
    base = statistics.median(cpu["instant"])
    print(f"{args.docs} documents, concurrency {args.concurrency}, median of {args.repeats}")
    print(f"{'replies':<26} {'CPU ms/record':>14} {'vs instant':>11} {'wall s':>8}")
    for kind in kinds:
        m = statistics.median(cpu[kind])
        print(f"{kind:<26} {m:>14.2f} {m / base:>10.2f}x {statistics.median(wall[kind]):>8.1f}")


if __name__ == "__main__":
    main()

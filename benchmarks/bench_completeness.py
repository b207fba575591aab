"""Cost per pair of ``--judge-mode complete`` against ``pmi`` on the embedded model, same run.

Both modes score the same gold pairs through the judges' own code (``likelihood_score``) on one
``LlamaCppBackend``, pair by pair and mode by mode in alternating order (``pmi`` first on even
pairs, ``complete`` first on odd ones), so load from other processes hits both alike. Each score is
taken cold: the backend's in-memory unconditional cache is cleared before each pair and mode, so
both pay their conditional and unconditional pass (``complete``'s conditional pass is one token
longer and reads one more logit row: the end-of-turn token). No disk cache is involved.

    .venv/bin/python benchmarks/bench_completeness.py [--pairs 16] [--model PATH.gguf]

Prints the median seconds per pair of each mode, the ratio (issue 17 asks for <= 1.2), and the
machine's load average (a shared 2-core machine moves absolute figures, much less the ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class BackendCtx:
    """What ``likelihood_score`` needs of a stage context: ``score_continuation`` on one backend, the
    conditional prompt being the instruction alone as the user message (humpback/pmi.j2)."""

    def __init__(self, backend):
        self.b = backend

    async def score_continuation(self, template, variables, continuation, **kwargs):
        messages = None if template is None else [{"role": "user", "content": variables["instruction"]}]
        return await self.b.score_continuation(messages, continuation, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--model", default="default", help="GGUF path, or 'default' for the embedded SmolLM2-135M")
    args = ap.parse_args()

    from btkit.kit.judges import likelihood_score
    from btkit_plugins.backends.llamacpp import LlamaCppBackend

    rows = [json.loads(l) for l in (ROOT / "examples" / "gold" / "faq_pairs.jsonl").read_text().splitlines() if l.strip()]
    pairs = rows[: args.pairs]
    backend = LlamaCppBackend(args.model, {})
    ctx = BackendCtx(backend)
    asyncio.run(backend.score_continuation([{"role": "user", "content": "Hi"}], "Hello.", end_of_turn=True))  # load, scoring copy
    times: dict[str, list[float]] = {"pmi": [], "complete": []}
    lengths = []
    for i, p in enumerate(pairs):
        lengths.append(len(backend.llm().tokenize(p["response"].encode(), add_bos=False, special=False)))
        for mode in (("pmi", "complete") if i % 2 == 0 else ("complete", "pmi")):
            backend._unconditional.clear()
            t = time.perf_counter()
            score, _ = asyncio.run(likelihood_score(ctx, mode, "humpback/pmi", {"instruction": p["instruction"]}, p["response"]))
            times[mode].append(time.perf_counter() - t)
            assert score is not None
    load = os.getloadavg()
    pmi, complete = statistics.median(times["pmi"]), statistics.median(times["complete"])
    print(f"{len(pairs)} gold pairs on {backend.spec}, response tokens median {statistics.median(lengths):.0f} "
          f"(min {min(lengths)}, max {max(lengths)}), load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print("| mode | s/pair median | min | max |")
    print("|---|---|---|---|")
    for mode in ("pmi", "complete"):
        print(f"| {mode} | {statistics.median(times[mode]):.3f} | {min(times[mode]):.3f} | {max(times[mode]):.3f} |")
    ratios = [c / p for c, p in zip(times["complete"], times["pmi"])]
    print()
    print(f"complete / pmi: {complete / pmi:.3f} (ratio of medians); per pair median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

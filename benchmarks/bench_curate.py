"""Humpback curation on the embedded model: rubric (generate, then parse) vs logprob (one forward pass).

Scores N (instruction, response) pairs both ways through the same templates the curate stage uses,
with no cache, and prints seconds per pair (median) and how many pairs got a score.

    .venv/bin/python benchmarks/bench_curate.py [--pairs 40] [--model llamacpp:default]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from pathlib import Path

from btkit.methods import ParseError
from btkit.plugins import get_registry
from btkit.prompts import PromptLibrary
from btkit.kit.judges import parse_score

ROOT = Path(__file__).resolve().parent.parent


def load_pairs(n: int) -> list[dict[str, str]]:
    gold = ROOT / "examples" / "gold" / "faq_pairs.jsonl"
    seed = ROOT / "examples" / "seed.jsonl"
    rows = []
    for path in (gold, seed):
        if path.exists():
            rows += [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    if len(rows) < n:
        raise SystemExit(f"need {n} pairs, found {len(rows)} in {gold} and {seed}")
    return [{"instruction": r["instruction"], "response": r["response"]} for r in rows[:n]]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--model", default="llamacpp:default")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    reg = get_registry()
    lib = PromptLibrary(reg.prompt_roots())
    backend = reg.make_backend(args.model, {})
    pairs = load_pairs(args.pairs)
    rubric_times, logprob_times = [], []
    rubric_scored = logprob_scored = 0
    # warm-up: load the model (and the scoring copy of its weights) once so neither mode pays for it
    await backend.chat([{"role": "user", "content": "hi"}], {"max_tokens": 1, "temperature": 0.0})
    if hasattr(backend, "scoring_llm"):
        backend.scoring_llm()
    # One mode after the other, as a run would issue them: interleaving would let the logprob call
    # reuse the KV cache of the rubric call for the same pair and time almost nothing.
    for p in pairs:
        prompt = lib.render("humpback/curate", {**p, "mode": "rubric"})
        t = time.perf_counter()
        comp = await backend.chat(prompt.messages, {"temperature": 0.0, "max_tokens": args.max_tokens})
        try:
            parse_score(comp.text)
            rubric_scored += 1
        except ParseError:
            pass
        rubric_times.append(time.perf_counter() - t)
    for p in pairs:
        prompt = lib.render("humpback/curate", {**p, "mode": "logprob"})
        t = time.perf_counter()
        lp = await backend.next_token_logprobs(prompt.messages, prompt.assistant_prefix, list("12345"))
        logprob_times.append(time.perf_counter() - t)
        logprob_scored += sum(math.exp(v) for v in lp.values()) > 0
    await backend.aclose()
    r, l = statistics.median(rubric_times), statistics.median(logprob_times)
    print(f"| curate mode | s/pair (median of {len(pairs)}) | pairs that got a score |")
    print("|---|---|---|")
    print(f"| rubric (generate <= {args.max_tokens} tokens, parse `Score: N`) | {r:.3f} | {rubric_scored} / {len(pairs)} |")
    print(f"| logprob (P(1..5) after `Score: `, one forward pass) | {l:.3f} | {logprob_scored} / {len(pairs)} |")
    print(f"\nlogprob is {r / l:.1f}x faster than rubric on {args.model}")


if __name__ == "__main__":
    asyncio.run(main())

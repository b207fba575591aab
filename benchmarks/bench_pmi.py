"""PMI curation on the embedded model: llama-cpp-python's high-level way vs btkit's ``score_continuation``.

Scores gold pairs whose responses are about 300 tokens (conditional + unconditional logprobs of
the response, i.e. one PMI/IFD score) three ways and prints the median seconds per pair:

- ``create_completion(echo=True, logprobs=1)`` on a ``logits_all=True`` model: the documented
  high-level way to get prompt logprobs;
- ``eval()`` on a ``logits_all=True`` model, then a numpy log-softmax of the continuation's rows;
- ``LlamaCppBackend.score_continuation``: the batch API asks for logits only at the response's
  positions and reuses the KV cache for the shared chat-frame prefix; once on the model's own
  Q4_1 weights (``-B score_weights=same``) and once as by default (a 16-bit copy of the weights,
  which llama.cpp batches 2-2.5x faster on CPU);
- the floor: the same two forward passes on the scoring copy with no logits read, the cost of
  the model itself on this machine.

    .venv/bin/python benchmarks/bench_pmi.py [--pairs 8] [--tokens 300] [--model PATH.gguf]

The machine's load average is printed too: on a shared 2-core machine, other processes running
llama.cpp slow every row (their OpenMP threads compete for the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pick_pairs(llm, n: int, tokens: int) -> list[dict[str, str]]:
    """The ``n`` gold pairs whose response length is closest to ``tokens`` tokens."""
    rows = [json.loads(l) for l in (ROOT / "examples" / "gold" / "faq_pairs.jsonl").read_text().splitlines() if l.strip()]
    sized = [(abs(len(llm.tokenize(r["response"].encode(), add_bos=False, special=False)) - tokens), i, r) for i, r in enumerate(rows)]
    return [r for _, _, r in sorted(sized)[:n]]


def mean_logprobs_echo(llm, prompt: list[int], target: list[int]) -> float:
    """echo needs a text prompt: the chat-formatted prompt and the response as one string."""
    text = llm.detokenize(prompt + target, special=True).decode("utf-8", "replace")
    out = llm.create_completion(text, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
    lps = out["choices"][0]["logprobs"]["token_logprobs"][-(len(target) + 1):-1]  # the last entry is the generated token
    return sum(lps) / len(lps)


def mean_logprobs_eval(llm, prompt: list[int], target: list[int]) -> float:
    import numpy as np

    llm.reset()
    llm.eval(prompt + target)
    rows = llm.scores[len(prompt) - 1: len(prompt) - 1 + len(target)].astype(np.float32)
    top = rows.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
    return float((rows[np.arange(len(target)), target] - log_z).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=300, help="pick responses closest to this many tokens")
    ap.add_argument("--model", default="default", help="GGUF path, or 'default' for the embedded SmolLM2-135M")
    ap.add_argument("--skip-echo", action="store_true", help="skip the slowest (create_completion echo) row")
    args = ap.parse_args()

    import llama_cpp

    from btkit_plugins.backends.llamacpp import UNCONDITIONAL_MESSAGES, LlamaCppBackend

    backend = LlamaCppBackend(args.model, {})
    same = LlamaCppBackend(args.model, {"score_weights": "same"})
    fast_llm = backend.llm()
    pairs = pick_pairs(fast_llm, args.pairs, args.tokens)
    naive = llama_cpp.Llama(model_path=str(backend.path), n_ctx=1024, n_threads=backend.n_threads, logits_all=True, verbose=False)
    lengths = [len(fast_llm.tokenize(p["response"].encode(), add_bos=False, special=False)) for p in pairs]

    def naive_pair(fn, p) -> float:
        target = naive.tokenize(p["response"].encode(), add_bos=False, special=False)
        cond = fn(naive, backend.prompt_tokens([{"role": "user", "content": p["instruction"]}]), target)
        uncond = fn(naive, backend.prompt_tokens(UNCONDITIONAL_MESSAGES), target)
        return cond - uncond

    async def fast_pair(b, p) -> float:
        b._unconditional.clear()  # time the full cost: both terms computed
        cond = await b.score_continuation([{"role": "user", "content": p["instruction"]}], p["response"])
        uncond = await b.score_continuation(None, p["response"])
        return sum(cond) / len(cond) - sum(uncond) / len(uncond)

    rows = []
    ways = [("eval() with logits_all=True + numpy log-softmax", lambda p: naive_pair(mean_logprobs_eval, p))]
    if not args.skip_echo:
        ways.insert(0, ("create_completion(echo=True, logprobs=1), logits_all=True", lambda p: naive_pair(mean_logprobs_echo, p)))
    ways.append(("btkit score_continuation, the model's Q4_1 weights (-B score_weights=same)", lambda p: asyncio.run(fast_pair(same, p))))
    copy_name = Path(str(backend.scoring_llm().model_path)).name.split('.')[-2]
    ways.append((f"btkit score_continuation, default (scoring copy: {copy_name})",
                 lambda p: asyncio.run(fast_pair(backend, p))))

    def floor_pair(p) -> float:
        """The two forward passes alone on the scoring copy, logits for the last position only:
        what no way of scoring can go below on this model and machine (no PMI value)."""
        scorer = backend.scoring_llm()
        target = scorer.tokenize(p["response"].encode(), add_bos=False, special=False)
        for prompt in (backend.prompt_tokens([{"role": "user", "content": p["instruction"]}]), backend.prompt_tokens(UNCONDITIONAL_MESSAGES)):
            scorer.reset()
            scorer._ctx.kv_cache_clear()
            scorer.eval(prompt + target)
        scorer.reset()
        scorer._ctx.kv_cache_clear()
        return math.nan

    ways.append((f"floor: the two forward passes alone ({copy_name} copy, no logits), not a score", floor_pair))
    results = {}
    for name, fn in ways:
        fn(pairs[-1])  # warm-up, not timed
        times, values = [], []
        for p in pairs:
            t = time.perf_counter()
            values.append(fn(p))
            times.append(time.perf_counter() - t)
        results[name] = values
        rows.append((name, statistics.median(times), min(times), max(times)))
    reference = results[ways[-4][0]]
    drift_same = max(abs(a - b) for a, b in zip(results[ways[-3][0]], reference))
    drift = max(abs(a - b) for a, b in zip(results[ways[-2][0]], reference))
    load = os.getloadavg()
    print(f"PMI (conditional + unconditional logprobs of the response) on {backend.spec}, {len(pairs)} gold pairs, "
          f"response tokens median {statistics.median(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), "
          f"n_threads {backend.n_threads}, load average {load[0]:.2f}")
    print()
    print("| way | s/pair median | min | max |")
    print("|---|---|---|---|")
    for name, med, lo, hi in rows:
        print(f"| {name} | {med:.3f} | {lo:.3f} | {hi:.3f} |")
    print()
    print(f"largest PMI difference from the logits_all reference: same weights {drift_same:.2e}, "
          f"default scoring copy {drift:.2e} nats/token")
    naive.close()
    asyncio.run(backend.aclose())
    asyncio.run(same.aclose())
    if math.isnan(drift):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

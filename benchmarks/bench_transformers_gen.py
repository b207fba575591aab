"""Generation speed of ``transformers:`` against the same model in ``llamacpp:`` after ``export-gguf``.

The model: an HF folder (``--model-dir``; by default the embedded SmolLM2-135M dequantized to F32,
as ``btkit train`` starts from it), exported once to an F16 GGUF (``export_gguf``). Each backend
answers the same prompts greedily (temperature 0: both give the same tokens, see
tests/test_export_gguf.py), called directly (no engine, no cache), after one warm-up call that
loads the model. A row's figure: generated tokens / wall seconds over all prompts, median of
``--repeats`` rounds. A second column times likelihood scoring (``score_continuation`` of one
~200-token response, what ``--judge-mode pmi|ifd|complete`` costs per pair): tokens scored per
second, median. Both backends use their default threads (half the CPUs: 1 on a 2-core machine).
A row with ``-B dtype=float16`` and the shipped Q4_1 file (``llamacpp:default``) are there for reference. Prints a markdown table.

Measured 2026-12-02 on the 2-core machine while other work kept its load average at 3-7, so the
rates moved by 2x between runs; read the ratios within a run. Generation tokens/s (ms/token),
scoring tokens/s:

| run | transformers F32 | transformers -B dtype=float16 | llamacpp: F16 export | llamacpp: shipped Q4_1 |
|---|---:|---:|---:|---:|
| 10:20, load 4-7 | 7.1 (140), 172 | - | 41.4 (24), 151 | 54.3 (18), 136 |
| 10:39, load 3-7 | 7.9 (127), 117 | 10.5 (95), 26 | 22.5 (44), 83 | 21.7 (46), 49 |

So transformers: generates 3-6x slower than the same model in llama.cpp and scores about as fast
or faster (one batched pass, where torch's F32 GEMM does well). Generating is bound by reading the
weights once per token: a profile of transformers' step puts 2/3 of its time in
``torch.nn.functional.linear`` over 0.54 GB of F32 weights (llama.cpp reads 0.27 GB of F16), the
rest in Python module overhead; ``model.generate`` was no faster (173 ms/token). For a loop that
generates much, export the trained model (``btkit export-gguf``) and generate with ``llamacpp:``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "Explain how a bicycle stays upright."}],
    [{"role": "user", "content": "Give me five tips for learning a new language."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Describe the water cycle."}],
]
RESPONSE = ("The water cycle is the continuous movement of water on, above and below the surface of the Earth. "
            "Water evaporates from oceans, lakes and rivers, rises as vapour, cools and condenses into clouds, "
            "and falls back as rain or snow. Some of it runs off into rivers and back to the sea; some soaks into "
            "the ground and feeds springs and wells; plants draw it up through their roots and release it through "
            "their leaves. The sun drives the whole cycle, and it shapes weather, climate and life on land. ") * 2


async def measure(backend, max_tokens: int, repeats: int) -> tuple[float, float, int]:
    """(generation tokens/s, scoring tokens/s, tokens generated per round), medians of ``repeats``."""
    await backend.chat(PROMPTS[0], {"temperature": 0, "max_tokens": 4})  # load the model
    await backend.score_continuation(PROMPTS[0], "Warm up.")
    gen, score, per_round = [], [], 0
    for _ in range(repeats):
        tokens, start = 0, time.perf_counter()
        for messages in PROMPTS:
            c = await backend.chat(messages, {"temperature": 0, "max_tokens": max_tokens})
            tokens += c.completion_tokens
        gen.append(tokens / (time.perf_counter() - start))
        per_round = tokens
        start = time.perf_counter()
        scored = await backend.score_continuation(PROMPTS[3], RESPONSE)
        score.append(scored.prompt_tokens / (time.perf_counter() - start))
    return statistics.median(gen), statistics.median(score), per_round


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="HF model folder (default: the embedded model's F32 copy)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="transformers: device (-B device=...)")
    args = ap.parse_args()

    from btkit_plugins.backends.llamacpp import LlamaCppBackend
    from btkit_plugins.backends.transformers_backend import TransformersBackend
    from btkit_plugins.train.base_model import hf_model_dir
    from btkit_plugins.train.gguf_export import export_gguf

    model_dir = args.model_dir or hf_model_dir(None)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        f16 = export_gguf(model_dir, None, Path(tmp) / "model.f16.gguf", "f16")
        export_s = time.perf_counter() - start
        rows = []
        for label, make in (
            (f"transformers:DIR (F32, {args.device})", lambda: TransformersBackend(str(model_dir), {"device": args.device})),
            (f"transformers:DIR -B dtype=float16 ({args.device})",
             lambda: TransformersBackend(str(model_dir), {"device": args.device, "dtype": "float16"})),
            ("llamacpp:export.f16.gguf", lambda: LlamaCppBackend(str(f16), {"score_weights": "same"})),
            ("llamacpp:default (shipped Q4_1)", lambda: LlamaCppBackend("default", {"score_weights": "same"})),
        ):
            backend = make()
            try:
                gen, score, tokens = asyncio.run(measure(backend, args.max_tokens, args.repeats))
            finally:
                asyncio.run(backend.aclose())
            rows.append((label, gen, score, tokens))
    print(f"model: {model_dir}; export to F16 took {export_s:.1f} s; {len(PROMPTS)} prompts, greedy, "
          f"max_tokens {args.max_tokens}, median of {args.repeats}")
    print()
    print("| backend | generation tokens/s | ms/token | scoring tokens/s | tokens per round |")
    print("|---|---:|---:|---:|---:|")
    for label, gen, score, tokens in rows:
        print(f"| {label} | {gen:.1f} | {1000 / gen:.0f} | {score:.0f} | {tokens} |")


if __name__ == "__main__":
    main()

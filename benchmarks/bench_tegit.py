"""TeGit's CPU per record outside model calls, on an in-process scripted backend (issue 13: under 1 ms).

Makes N documents (default 10,000; 60-110 words each, seeded), segments them with the method's own
``prepare``, and drives every unit through ``tegit.augment`` and ``tegit.curate`` with the engine
(``Run.process_unit``: hooks, failure handling and lineage as in ``btkit run``; no cache, one unit at
a time). The scripted backend answers each augment prompt with a task built from the document, a
realistic mix: mostly well-formed and grounded, some with no tags, a repeated tag or an ungrounded
output (so the drop paths are timed too); the judge answers from a fixed
logprob table. ``complete``, ``next_token_logprobs`` and ``score_continuation`` of the engine's
stage context are timed from the inside (rendering, the engine's call bookkeeping and the backend),
and that time is subtracted: what remains is the method's own work (parsing, grounding, fields,
decisions) plus the engine's per-stage handling of the record. ``to_output`` is timed on every kept
record. Prints CPU ms per record (``time.process_time``).

    .venv/bin/python benchmarks/bench_tegit.py [--records 10000] [--grounding overlap|likelihood|off|all]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from btkit.calls import StageCtx
from btkit.config import StageSpec, run_config
from btkit.engine import Run
from btkit.plugins import get_registry
from btkit.testing.backends import DOUBLES_PLUGIN, Doubles, ScriptedBackend

VOCAB = ("package install remove upgrade dependency mirror archive kernel module driver shell prompt terminal console "
         "user group permission file directory mount disk partition network interface address service daemon log "
         "editor command option manual page release stable testing unstable security update source binary build").split()
ROOT = Path(__file__).resolve().parent.parent


def documents(n: int, seed: int = 11) -> list[dict[str, str]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = []
        for _ in range(rng.randint(6, 10)):
            words = [rng.choice(VOCAB) for _ in range(rng.randint(8, 13))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append({"id": f"doc{i}", "text": f"Note {i}. " + " ".join(sentences)})
    return docs


def task_reply(messages, params) -> str:
    """A task from the document in the last user turn: 80 % well-formed and grounded, the rest broken."""
    content = messages[-1]["content"]
    body = content.split("\n", 3)[3].rsplit("\n", 1)[0] if content.count("\n") >= 4 else content
    first = body.split(". ")[1] if ". " in body else body
    kind = sum(map(ord, first[:12])) % 10
    if kind == 0:
        return "This note is about packages and how to install them."  # no tags
    if kind == 1:
        return f"#instruction#: Explain the note.\n#input#: {first}\n#output#: {first}\n#output#: {first}"  # repeated tag
    if kind == 2:
        return "#instruction#: What is a good breakfast?\n#input#:\n#output#: Porridge with berries, toast and coffee."  # ungrounded
    words = first.split()
    return (f"#instruction#: What does the note say about {words[0].lower()} {words[1]}?\n#input#:\n"
            f"#output#: It says: {first.rstrip('.').lower()}, as the note explains.")


def lp(messages, continuation):
    n = max(1, len(continuation.split()))
    return [-3.0] * n if messages is None else [-2.0] * n


async def measure(registry, spec: str, corpus: Path, out: Path, grounding: str, n: int) -> dict[str, float]:
    method = registry.method("tegit")
    config = run_config([StageSpec("tegit", "augment", {"grounding": grounding}), StageSpec("tegit", "curate", {})],
                        input=corpus, out_dir=out, model=spec, quiet=True, use_cache=False)
    run = Run(config, registry)
    run.check()
    inside = [0.0]
    originals = {}
    for name in ("complete", "next_token_logprobs", "score_continuation"):
        original = getattr(StageCtx, name)
        originals[name] = original

        def timed(original):
            async def wrapper(self, *args, **kwargs):
                t = time.process_time()
                try:
                    return await original(self, *args, **kwargs)
                finally:
                    inside[0] += time.process_time() - t
            return wrapper

        setattr(StageCtx, name, timed(original))
    try:
        rows = [json.loads(line) for line in corpus.read_text().splitlines()]
        options = method.option_defaults()
        t = time.process_time()
        units = list(method.prepare(iter(rows), options))
        prepare_s = time.process_time() - t
        kept = []
        t = time.process_time()
        for unit in units:
            for rec in await run.process_unit(unit):
                if rec.alive:
                    kept.append(rec)
        stages_s = time.process_time() - t
        t = time.process_time()
        lines = [method.to_output(r) for r in kept]
        output_s = time.process_time() - t
    finally:
        for name, original in originals.items():
            setattr(StageCtx, name, original)
        await run.aclose()
    assert len(units) == n and lines, (len(units), len(lines))
    ms = lambda s: 1000 * s / n  # noqa: E731
    return {"records": n, "kept": len(kept), "prepare": ms(prepare_s), "stages_outside_calls": ms(stages_s - inside[0]),
            "to_output": ms(output_s), "outside_calls": ms(prepare_s + stages_s - inside[0] + output_s),
            "inside_calls": ms(inside[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--grounding", choices=("overlap", "likelihood", "off", "all"), default="all")
    args = ap.parse_args()
    registry = get_registry()
    # the test doubles are no production backends: this process registers its own (replacing the stateless
    # module that BTKIT_EXTRA_PLUGINS may have loaded, as btkit's pytest plugin does)
    if registry.pm.has_plugin(DOUBLES_PLUGIN):
        registry.unregister(DOUBLES_PLUGIN)
    doubles = Doubles()
    registry.register(doubles, name=DOUBLES_PLUGIN)
    modes = ("overlap", "likelihood", "off") if args.grounding == "all" else (args.grounding,)
    print(f"tegit, {args.records} records, scripted backend in process, no cache; CPU ms per record (process_time)")
    print(f"{'grounding':<11} {'kept':>6} {'prepare':>8} {'stages':>8} {'output':>8} {'OUTSIDE calls':>14} {'inside calls':>13}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "c.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in documents(args.records)))
        for i, mode in enumerate(modes):
            backend = doubles.script(f"bench{i}", ScriptedBackend(default=task_reply, logprobs={"5": -0.1, "4": -2.5},
                                                                  continuation_logprobs=lp))
            r = asyncio.run(measure(registry, backend.spec, corpus, Path(d) / f"out{i}", mode, args.records))
            worst = max(worst, r["outside_calls"])
            print(f"{mode:<11} {r['kept']:>6} {r['prepare']:>8.3f} {r['stages_outside_calls']:>8.3f} {r['to_output']:>8.3f} "
                  f"{r['outside_calls']:>14.3f} {r['inside_calls']:>13.3f}")
    print(f"\nworst CPU per record outside model calls: {worst:.3f} ms (target < 1 ms): {'OK' if worst < 1 else 'OVER'}")
    sys.exit(0 if worst < 1 else 1)


if __name__ == "__main__":
    main()

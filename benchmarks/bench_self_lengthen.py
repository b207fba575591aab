"""Self-Lengthen's CPU per record outside model calls, on an in-process scripted backend (issue 13: under 1 ms).

Makes N instructions (default 10,000), and drives every unit through ``self_lengthen.self_instruct``
(pass-through), ``generate`` and ``extend`` with the engine (``Run.process_unit``: hooks, failure
handling and lineage as in ``btkit run``; no cache, one unit at a time). The scripted backend writes
seeded text of the sizes this method handles on a small model: initial responses of 150-400 words in
5-9 paragraphs, expansions of the first half, continuations about as long as the draft; a realistic
mix of failures (an initial response cut mid-sentence or repeating a 10-word run, so the generator
re-samples; continuations that trail off or come out shorter, so rounds fail and some extensions are
dropped). The engine's stage-context calls (``complete``: rendering, call bookkeeping, the backend)
are timed from the inside and subtracted, but the method's parse functions that run inside them
(:func:`check_response`, :func:`checked`, :func:`parse_text`) are timed separately and counted as the method's own
work, with everything else it does (splitting, counting words, the extender pair's prompt, fields,
decisions). ``to_output`` is timed on every kept record, and the ``stats.json`` section
(:func:`length_report`) over the journal lines. Prints CPU ms (``time.process_time``) per unit (one
instruction: a generate call or more, two per extension round, two records when accepted) and per
record written (kept or dropped), the issue's measure.

    .venv/bin/python benchmarks/bench_self_lengthen.py [--records 10000] [--rounds 3]
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

import btkit_plugins.methods.self_lengthen as sl

VOCAB = ("package install remove upgrade dependency mirror archive kernel module driver shell prompt terminal console "
         "user group permission file directory mount disk partition network interface address service daemon log "
         "editor command option manual page release stable testing unstable security update source binary build "
         "branch commit merge rebase remote history tag stash bisect patch review").split()


def instructions(n: int) -> list[dict[str, str]]:
    rng = random.Random(5)
    return [{"id": f"i{i}", "instruction": f"Write a detailed guide ({i}) on " + " ".join(rng.choice(VOCAB) for _ in range(rng.randint(6, 20))) + "."}
            for i in range(n)]


def text(rng: random.Random, n_words: int, paragraphs: int) -> str:
    per = max(1, n_words // paragraphs)
    out = []
    for _ in range(paragraphs):
        words = [rng.choice(VOCAB) for _ in range(per)]
        out.append(" ".join(words).capitalize() + ".")
    return "\n\n".join(out)


def draft_of(content: str) -> str:
    return content.split("<<<DRAFT ", 1)[1].split("\n", 1)[1].rsplit("\nDRAFT ", 1)[0]


def reply(messages, params) -> str:
    content = messages[-1]["content"]
    rng = random.Random(f"{content[-200:]}|{params.get('seed')}")
    roll = rng.random()
    if "Rewrite the draft into a fuller answer" in content:
        draft = draft_of(content)
        n = len(draft.split())
        if "assistant_prefix" not in params and int(params.get("seed") or 0) % 2 == 0:  # the expansion of the first half
            return text(rng, int(n * 1.6), max(3, draft.count("\n\n") + 2))
        if roll < 0.08 or "(7" in content.split("Request: ", 1)[1][:30]:  # and every extension of one unit in ten
            return " and then it trails off"
        if roll < 0.15:
            return "\n\nShort."
        return "\n\n" + text(rng, n, max(2, draft.count("\n\n") + 1))
    if messages[0]["content"] == "You are a helpful assistant.":  # generate
        body = text(rng, rng.randint(150, 400), rng.randint(5, 9))
        if roll < 0.1:
            return body[: len(body) // 2].rstrip(". ")  # cut mid-sentence
        if roll < 0.15:
            words = body.split()
            return " ".join(words + words[:12]) + "."  # a repeated run
        return body
    raise AssertionError(content[:200])


async def measure(registry, spec: str, corpus: Path, out: Path, n: int, rounds: int) -> dict[str, float]:
    method = registry.method("self_lengthen")
    config = run_config([StageSpec("self_lengthen", "self_instruct", {}), StageSpec("self_lengthen", "generate", {}),
                         StageSpec("self_lengthen", "extend", {"rounds": rounds})],
                        input=corpus, out_dir=out, model=spec, quiet=True, use_cache=False)
    run = Run(config, registry)
    run.check()
    inside, parsing = [0.0], [0.0]
    originals = {"complete": StageCtx.complete}

    async def complete(self, *args, **kwargs):
        t = time.process_time()
        try:
            return await originals["complete"](self, *args, **kwargs)
        finally:
            inside[0] += time.process_time() - t

    depth = [0]

    def timed_parse(fn):
        def wrapper(*args, **kwargs):  # check_response calls checked: count the outer call only
            depth[0] += 1
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    parsing[0] += time.process_time() - t
        return wrapper

    parse_fns = {name: getattr(sl, name) for name in ("check_response", "checked", "parse_text")}
    StageCtx.complete = complete
    for name, fn in parse_fns.items():
        setattr(sl, name, timed_parse(fn))
    try:
        rows = [json.loads(line) for line in corpus.read_text().splitlines()]
        options = method.option_defaults()
        t = time.process_time()
        units = list(method.prepare(iter(rows), options))
        prepare_s = time.process_time() - t
        records = []
        t = time.process_time()
        for unit in units:
            records += await run.process_unit(unit)
        stages_s = time.process_time() - t
        kept = [r for r in records if r.alive]
        t = time.process_time()
        lines = [method.to_output(r) for r in kept]
        report = sl.length_report(r.to_candidate() for r in records)
        output_s = time.process_time() - t
    finally:
        StageCtx.complete = originals["complete"]
        for name, fn in parse_fns.items():
            setattr(sl, name, fn)
        await run.aclose()
    assert len(units) == n and lines, (len(units), len(lines))
    ms = lambda s: 1000 * s / n  # noqa: E731
    own_stages = stages_s - inside[0] + parsing[0]
    return {"units": n, "records": len(records), "kept": len(kept), "dropped": len(records) - len(kept), "prepare": ms(prepare_s),
            "stages_outside_calls": ms(own_stages), "parse": ms(parsing[0]), "to_output_and_report": ms(output_s),
            "outside_calls": ms(prepare_s + own_stages + output_s), "inside_calls": ms(inside[0] - parsing[0]), "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    registry = get_registry()
    # the test doubles are no production backends: this process registers its own (replacing the stateless
    # module that BTKIT_EXTRA_PLUGINS may have loaded, as btkit's pytest plugin does)
    if registry.pm.has_plugin(DOUBLES_PLUGIN):
        registry.unregister(DOUBLES_PLUGIN)
    doubles = Doubles()
    registry.register(doubles, name=DOUBLES_PLUGIN)
    with tempfile.TemporaryDirectory() as d:
        corpus = Path(d) / "in.jsonl"
        corpus.write_text("".join(json.dumps(r) + "\n" for r in instructions(args.records)))
        backend = doubles.script("bench", ScriptedBackend(default=reply))
        r = asyncio.run(measure(registry, backend.spec, corpus, Path(d) / "out", args.records, args.rounds))
    rep = r["report"]
    per_record = r["outside_calls"] * r["units"] / r["records"]
    print(f"self_lengthen, {args.records} units, {args.rounds} rounds, scripted backend in process, no cache; CPU ms per unit (process_time)")
    print(f"records written {r['records']}: kept {r['kept']} (two per accepted unit), dropped {r['dropped']}; "
          f"accepted {rep['accepted']} / {rep['extensions']} extensions; mean words {rep['kept_mean_initial_words']} -> {rep['kept_mean_extended_words']}")
    print(f"{'prepare':>8} {'stages':>8} {'(parse)':>8} {'output':>8} {'OUTSIDE calls':>14} {'inside calls':>13}")
    print(f"{r['prepare']:>8.3f} {r['stages_outside_calls']:>8.3f} {r['parse']:>8.3f} {r['to_output_and_report']:>8.3f} "
          f"{r['outside_calls']:>14.3f} {r['inside_calls']:>13.3f}")
    print(f"\nCPU outside model calls: {r['outside_calls']:.3f} ms per unit (an instruction: about 7 model calls, two records), "
          f"{per_record:.3f} ms per record written (target < 1 ms): {'OK' if per_record < 1 else 'OVER'}")
    sys.exit(0 if per_record < 1 else 1)


if __name__ == "__main__":
    main()

"""LINGUIST's CPU per record outside model calls, on an in-process scripted backend (issue 13: under 1 ms).

A record is one generated utterance line. Makes a spec of ``--intents`` intents (3 slots, 6 examples and
a catalogue each, seeded), turns it into units with the method's own ``prepare`` (``--requests`` per
intent), and drives every unit through ``linguist.generate`` with the engine (``Run.process_unit``: hooks,
failure handling and lineage as in ``btkit run``; no cache, one unit at a time). The scripted backend
answers each prompt with ``--per-request`` lines read off the prompt's ``<include>``: about 70 % valid,
the rest an unclosed bracket, a missing slot, an unknown slot number, a duplicate or a heading (so the
drop paths are timed too). ``StageCtx.complete`` is timed from the inside (rendering, the engine's
call bookkeeping, the backend) and that time is subtracted; the reply split it runs (``split_lines``,
the method's own parse) is timed on its own and added back. Then the whole-run work is timed on the
journal lines: the cross-run de-duplication (``end_of_run``) and the per-intent report (JSON lines
parsed back as the run-end hook reads them from ``candidates.jsonl``), and
``to_output`` on every kept record. Prints CPU ms per record (``time.process_time``).

    .venv/bin/python benchmarks/bench_linguist.py [--records 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from btkit.calls import StageCtx
from btkit.config import StageSpec, run_config
from btkit.engine import Run
from btkit.plugins import get_registry
from btkit.testing.backends import DOUBLES_PLUGIN, Doubles, ScriptedBackend

from btkit_plugins.methods.linguist import LABEL, intent_report, split_lines

VERBS = "play find show open add put start queue book order check get send move set".split()
NOUNS = "song album recipe soup stew package train ticket table room lamp playlist note file folder".split()
_INCLUDE = re.compile(r"<include>(.*)</include>")
_PAIR = re.compile(r"\[(\d+) (.+?) \]")


def spec(n: int, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    intents = []
    for i in range(n):
        slots = [f"s{i}_{k}" for k in range(3)]
        examples = [f"{rng.choice(VERBS)} [{slots[0]}: {rng.choice(NOUNS)} {j}] for [{slots[1]}: {rng.choice(NOUNS)}] now"
                    for j in range(6)]
        intents.append({"intent": f"intent_{i}", "slots": slots, "examples": examples,
                        "values": {slots[2]: [f"{rng.choice(NOUNS)} {k}" for k in range(8)]}})
    return intents


REPLIES: list[str] = []


def reply(messages, params) -> str:
    """Lines as asked, a realistic mix: about 70 % valid, the rest broken in each of the ways the checks catch."""
    user = messages[-1]["content"]
    include = _PAIR.findall(_INCLUDE.search(user).group(1))
    n = int(re.search(r"Write (\d+) new", user).group(1))
    rng = random.Random(user)
    lines = []
    for k in range(n):
        slots = [f"[{num} {'fresh ' + rng.choice(NOUNS) + ' ' + str(rng.randint(0, 9999)) if v == '*' else v} ]" for num, v in include]
        roll = rng.random()
        if roll < 0.06:
            text = "Here are the utterances:"
        elif roll < 0.12:
            text = f"{rng.choice(VERBS)} [1 something unclosed"
        elif roll < 0.18:
            text = f"{rng.choice(VERBS)} the {rng.choice(NOUNS)} please"  # no slot: missing_slot
        elif roll < 0.24:
            text = f"{rng.choice(VERBS)} {' and '.join(slots)} plus [9 extra ]"  # unknown slot
        elif roll < 0.30 and lines:
            text = lines[-1].upper()  # a duplicate within the reply
        else:
            text = f"{rng.choice(VERBS)} {' with '.join(slots)} {rng.choice(NOUNS)} {k}"
        lines.append(text)
    out = "\n".join(f"- {l}" for l in lines)
    REPLIES.append(out)
    return out


async def measure(registry, backend_spec: str, path: Path, out: Path, n_intents: int, requests: int, per_request: int) -> dict:
    method = registry.method("linguist")
    options = {**method.option_defaults(), "requests": requests, "per_request": per_request}
    config = run_config([StageSpec("linguist", "generate", {"requests": requests, "per_request": per_request})],
                        input=path, out_dir=out, model=backend_spec, quiet=True, use_cache=False)
    run = Run(config, registry)
    run.check()
    stage = run.stages[0]
    inside = [0.0]
    original = StageCtx.complete

    async def timed(self, *args, **kwargs):
        t = time.process_time()
        try:
            return await original(self, *args, **kwargs)
        finally:
            inside[0] += time.process_time() - t

    StageCtx.complete = timed
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        t = time.process_time()
        units = list(method.prepare(iter(rows), options))
        prepare_s = time.process_time() - t
        records = []
        t = time.process_time()
        for seq, unit in enumerate(units):
            for rec in await run.process_unit(unit):
                records.append((seq, rec))
        stages_s = time.process_time() - t
    finally:
        StageCtx.complete = original
        await run.aclose()
    t = time.process_time()
    for r in REPLIES:
        split_lines(r)
    split_s = time.process_time() - t
    journal = [{**rec.to_candidate(), "unit": units[seq].id, "unit_seq": seq} for seq, rec in records]
    t = time.process_time()
    drops = stage.end_of_run(lambda: iter(journal))
    end_s = time.process_time() - t
    for line in journal:
        if f"{line['unit_seq']}/{line['id']}" in drops:
            line.update(status="dropped", dropped_at=LABEL, reason="duplicate", end_of_run=True)
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in journal)  # as the journal holds them
    t = time.process_time()
    report = intent_report(json.loads(raw) for raw in text.splitlines())  # what the run-end hook reads and counts
    report_s = time.process_time() - t
    kept = [rec for (seq, rec), line in zip(records, journal) if line["status"] == "kept"]
    t = time.process_time()
    lines = [method.to_output(r) for r in kept]
    output_s = time.process_time() - t
    n = sum(1 for _, rec in records if "annotated" in rec.fields)  # generated lines (a failed unit has none)
    assert n and lines and sum(r["kept"] for r in report.values()) == len(lines)
    ms = lambda s: 1000 * s / n  # noqa: E731
    reasons: dict[str, int] = {}
    for line in journal:
        if line["status"] == "dropped":
            reasons[line["reason"]] = reasons.get(line["reason"], 0) + 1
    own = prepare_s + stages_s - inside[0] + split_s + end_s + report_s + output_s
    return {"records": n, "units": len(units), "kept": len(lines), "drops": dict(sorted(reasons.items())),
            "prepare": ms(prepare_s), "stage_outside_calls": ms(stages_s - inside[0] + split_s), "end_of_run_dedup": ms(end_s),
            "intent_report": ms(report_s), "to_output": ms(output_s), "outside_calls": ms(own),
            "inside_complete_excluded": ms(inside[0])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=10_000, help="utterance lines to generate (default 10,000)")
    ap.add_argument("--per-request", type=int, default=5)
    ap.add_argument("--requests", type=int, default=40, help="units per intent")
    args = ap.parse_args()
    units = -(-args.records // args.per_request)
    n_intents = -(-units // args.requests)
    registry = get_registry()
    # the test doubles are no production backends: this process registers its own (replacing the stateless
    # module BTKIT_EXTRA_PLUGINS may have loaded, as under pytest)
    if registry.pm.has_plugin(DOUBLES_PLUGIN):
        registry.unregister(DOUBLES_PLUGIN)
    doubles = Doubles()
    registry.register(doubles, name=DOUBLES_PLUGIN)
    doubles.script("bench", ScriptedBackend(default=reply))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.jsonl"
        path.write_text("".join(json.dumps(i) + "\n" for i in spec(n_intents)))
        result = asyncio.run(measure(registry, "scripted:bench", path, Path(d) / "out", n_intents, args.requests, args.per_request))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, indent=2))
    verdict = "under" if result["outside_calls"] < 1.0 else "OVER"
    print(f"linguist: {result['outside_calls']:.3f} ms CPU per record outside model calls over {result['records']} records "
          f"({verdict} the 1 ms target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

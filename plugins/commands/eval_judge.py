"""``btkit eval-judge``: measure how well a method's curate stage tells good pairs from bad ones.

The curate stage is the weak link of instruction backtranslation (Humpback's own judge had
precision/recall 0.44/0.09), so it must be measurable on the model you will run it with. From gold
(instruction, response) pairs written by people this builds pairs the judge should reject:

- ``swapped``: each response with another pair's instruction (a derangement drawn from ``--seed``);
- ``truncated``: each instruction with only the first 30% of its response's words
  (:data:`TRUNCATE_SHARE`), the rest cut off;
- ``text_ref``: each response with an instruction that points at "the text" instead of standing
  alone ("Summarize the text above."), the backtranslation failure Kun filters for.

Every item goes through the method's own curate stage with the engine (``Run.process_unit``: its
cache, hooks and failure handling), exactly as in ``btkit run``; ``--judge-mode`` (repeatable)
compares judge modes on the same items. Only a stage that scores (instruction, response) pairs can be
measured this way (humpback.curate, backforth.curate: :func:`judges_pairs`); Kun's, CRAB's and
AIR's judges look at the instruction, the text or constraints alone, and are refused with one
line naming the stages that can be evaluated. The report gives ROC AUC (unscored items count as
rejected; also among scored items only), precision and recall of the keep decision at the configured
threshold, the share of items that got a score, and seconds per item. The clock starts after one
tiny call of the kind the mode makes has loaded the model (and, for ``llamacpp:``, written its
scoring copy of the weights once), so s/item is scoring time; the report also says how many items
the cache answered whole (``items_from_cache``): a rerun's near-zero s/item is that, not speed.
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import click

from btkit.errors import BtkitError
from btkit.hookspecs import hookimpl
from btkit.options import CONCURRENCY, PERCENT, SCORE

from btkit.kit.judges import Curator, JudgeModeType, auto_choice_line, rank_value, top_percent_cutoff

NEGATIVE_KINDS = ("swapped", "truncated", "text_ref")

#: Instructions that only make sense next to a document the user never sees.
TEXT_REFERENCE_INSTRUCTIONS = (
    "Summarize the text above.",
    "What is the main point of this passage?",
    "Rewrite the paragraph above in simpler words.",
    "According to the article, what should the reader do?",
    "Explain what the text says.",
    "List the key facts mentioned in the passage.",
)

#: Score parts copied from each item's meta into the JSON report's ``item_scores``, so another way of
#: combining them can be measured from one run (the likelihood modes' parts; ``score_expected`` of logprob).
ITEM_PARTS = ("pmi", "ifd", "cond_logprob", "uncond_logprob", "cond_tokens", "end_cond_logprob", "end_uncond_logprob",
              "complete_term", "score_expected")

#: The ``truncated`` negative keeps this share of its response's words (the first 30%).
TRUNCATE_SHARE = 0.3


@dataclass
class Item:
    """One pair to score: ``label`` 1 for a gold pair, 0 for a negative the judge should reject."""

    id: str
    kind: str
    label: int
    instruction: str
    response: str
    gold_id: str
    score: float | None = None
    kept: bool = False
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    calls: int = 0  # model calls made for this item (not answered by the cache or a shared in-flight call)
    cached: int = 0


def derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation with no fixed point (Sattolo's algorithm: one random cycle)."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def truncate_words(text: str, share: float = TRUNCATE_SHARE) -> str | None:
    """The text cut after the first ``share`` of its words (layout kept); None if that cuts nothing."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    keep = max(1, math.floor(len(ends) * share))
    if keep >= len(ends):
        return None
    return text[: ends[keep - 1]]


def build_items(pairs: list[dict[str, str]], seed: int = 0, kinds: Iterable[str] = NEGATIVE_KINDS) -> list[Item]:
    """Gold pairs as positives plus the negatives of ``kinds``, deterministic for a given ``seed``."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(NEGATIVE_KINDS))
    if unknown:
        raise BtkitError(f"unknown negative kind(s) {', '.join(unknown)}; choose from {', '.join(NEGATIVE_KINDS)}")
    rng = random.Random(seed)
    items = [Item(f"gold:{p['id']}", "gold", 1, p["instruction"], p["response"], p["id"]) for p in pairs]
    n = len(pairs)
    if "swapped" in kinds and n >= 2:
        perm = derangement(n, rng)
        for i, j in enumerate(perm):
            if _norm(pairs[j]["instruction"]) == _norm(pairs[i]["instruction"]):
                continue  # the same question twice in the gold set: not a negative
            items.append(Item(f"swapped:{pairs[i]['id']}", "swapped", 0, pairs[j]["instruction"], pairs[i]["response"], pairs[i]["id"]))
    if "truncated" in kinds:
        for p in pairs:
            cut = truncate_words(p["response"])
            if cut is not None:
                items.append(Item(f"truncated:{p['id']}", "truncated", 0, p["instruction"], cut, p["id"]))
    if "text_ref" in kinds:
        for p in pairs:
            items.append(Item(f"text_ref:{p['id']}", "text_ref", 0, rng.choice(TEXT_REFERENCE_INSTRUCTIONS), p["response"], p["id"]))
    return items


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def roc_auc(scores: list[float | None], labels: list[int]) -> float | None:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; ties get average ranks (count half).

    ``None`` scores rank below every number (the stage drops what it cannot score). Returns None
    without both classes.
    """
    n_pos = sum(1 for l in labels if l == 1)
    n_neg = len(labels) - n_pos
    if not n_pos or not n_neg:
        return None
    keyed = sorted(range(len(scores)), key=lambda i: -math.inf if scores[i] is None else scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(keyed):
        j = i
        value = scores[keyed[i]]
        while j + 1 < len(keyed) and scores[keyed[j + 1]] == value:
            j += 1
        for k in range(i, j + 1):
            ranks[keyed[k]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    pos_rank_sum = sum(r for r, l in zip(ranks, labels) if l == 1)
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def precision_recall(kept: list[bool], labels: list[int]) -> tuple[float | None, float | None]:
    tp = sum(1 for k, l in zip(kept, labels) if k and l == 1)
    predicted = sum(kept)
    positives = sum(1 for l in labels if l == 1)
    return (tp / predicted if predicted else None), (tp / positives if positives else None)


def judges_pairs(method: Any, stage_name: str) -> bool:
    """Whether a method's stage scores an (instruction, response) pair the way eval-judge measures:
    through the shared :class:`~btkit.kit.judges.Curator` (a score per pair, a keep decision).

    Other curate stages judge something else (Kun's ``judge`` and AIR's ``score`` the instruction
    alone, CRAB's ``verify`` constraints the input does not have, Kun's ``perplexity`` the text),
    so every gold pair and negative would go unscored or be scored blind to the response.
    """
    info = next((s for s in method.stages if s.name == stage_name), None)
    if info is None or info.kind != "curate":
        return False
    try:
        stage = method.stage_with_defaults(stage_name, {})
    except BtkitError:  # a stage that needs options to be built is not one we can evaluate
        return False
    return isinstance(getattr(stage, "curator", None), Curator)


def judge_stage(registry: Any, method_name: str, stage_name: str | None) -> str:
    """The stage of ``method_name`` to evaluate (``stage_name``, else the first that judges pairs),
    or a :class:`BtkitError` naming the stages that can be evaluated."""
    method = registry.method(method_name)
    candidates = [stage_name] if stage_name else [s.name for s in method.stages]
    for name in candidates:
        if judges_pairs(method, name):
            return name
    usable = sorted(f"{m.name}.{s.name}" for m in registry.methods().values() for s in m.stages if judges_pairs(m, s.name))
    problem = f"stage '{method_name}.{stage_name}' does not" if stage_name else f"method '{method_name}' has no stage that does"
    raise BtkitError(f"eval-judge measures a stage that scores (instruction, response) pairs and {problem}; "
                     f"stages that can be evaluated: {', '.join(usable) or 'none installed'} (--method METHOD --stage STAGE)")


def load_gold(path: Path, limit: int | None) -> list[dict[str, str]]:
    from btkit.io import iter_jsonl

    pairs = []
    for lineno, row in iter_jsonl(path, ("instruction", "response")):
        pairs.append({"id": str(row.get("id") or f"line{lineno}"), "instruction": row["instruction"], "response": row["response"]})
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise BtkitError(f"{path}: no gold pairs")
    return pairs


async def score_items(items: list[Item], *, registry: Any, gold: Path, method: str, stage_name: str | None, model: str,
                      stage_options: dict[str, Any], backend_options: dict[str, Any], prompt_overrides: list[Path],
                      cache_path: Path | None, use_cache: bool, concurrency: int) -> dict[str, Any]:
    """Score every item through the method's curate stage with the engine (``Run.process_unit``), so
    hooks, caching and failure handling are those of ``btkit run``; fills the items."""
    import asyncio

    from btkit.config import StageSpec, run_config
    from btkit.engine import Run
    from btkit.records import Record

    name = judge_stage(registry, method, stage_name)
    config = run_config([StageSpec(method, name, stage_options)], input=gold, out_dir=Path("."), model=model,
                        backend_options=backend_options, prompt_overrides=prompt_overrides, concurrency=concurrency,
                        quiet=True, cache_path=cache_path, use_cache=use_cache)
    run = Run(config, registry)
    stage = run.stages[0]
    run.check()  # templates, and a backend that cannot score this way, fail here before any call
    backend = run.backend_for(stage)
    auto_choice = auto_choice_line(stage, backend)  # what --judge-mode auto picked here, and why

    async def one(item: Item) -> None:
        record = Record(id=item.id, source_id=item.gold_id, fields={"instruction": item.instruction, "response": item.response})
        outs = await run.process_unit(record)
        out = outs[0] if outs else record
        item.meta = {k: v for k, v in out.meta.items() if k != "drop_details"}
        item.kept = out.alive
        steps = [st for st in out.lineage if st.get("stage") == stage.label]
        item.cached = sum(1 for st in steps if st.get("cached"))
        item.calls = len(steps) - item.cached
        item.score = rank_value(out.meta)
        if out.reason in ("backend_error", "stage_error"):  # a failed call loses this item, as in a run
            item.error = f"{out.reason}: {(out.meta.get('drop_details') or {}).get('error', '')}"
        elif item.score is None:
            item.error = out.meta.get("score_error") or out.reason

    try:
        t_warm = time.perf_counter()
        warmup_error = await warm_up(backend, getattr(stage, "curator", None))
        warmup_s = time.perf_counter() - t_warm
        t0 = time.perf_counter()
        await asyncio.gather(*(one(it) for it in items))
        wall = time.perf_counter() - t0
    finally:
        await run.aclose()
    curator = getattr(stage, "curator", None)
    keep_top = getattr(curator, "keep_top", None)
    cutoff = None
    if keep_top is not None:
        cutoff = top_percent_cutoff([it.score for it in items if it.score is not None], keep_top)
        for it in items:
            it.kept = it.kept and it.score is not None and cutoff is not None and it.score >= cutoff
    return {"stage": stage.label, "wall_s": wall, "warmup_s": warmup_s, "warmup_error": warmup_error,
            "cache_hits": sum(it.cached for it in items), "model_calls": sum(it.calls for it in items),
            "items_from_cache": sum(1 for it in items if it.cached and not it.calls),
            "threshold": curator.cutoff(curator.resolve_mode(backend)) if curator else None, "keep_top": keep_top, "keep_top_cutoff": cutoff,
            "mode": getattr(curator, "mode", stage_options.get("judge_mode")), "auto_choice": auto_choice}


#: What the warm-up call sends: tiny, and never a cache entry (it goes to the backend directly).
WARMUP_MESSAGES = [{"role": "user", "content": "Hi"}]


async def warm_up(backend: Any, curator: Any) -> str | None:
    """One tiny call of the kind the judge mode makes, so model loading (and llamacpp's one-off
    conversion of its scoring weights) is not timed as scoring. A stage without a shared
    ``Curator`` (Kun's judge, say) gets a one-token chat call: it loads the model, but a scoring
    copy that stage loads later is still timed. Returns the error if it failed: the items then
    record their own failures, nothing stops."""
    from btkit.kit.judges import LIKELIHOOD_MODES

    mode = curator.resolve_mode(backend) if curator is not None else "rubric"
    try:
        if mode in LIKELIHOOD_MODES:
            await backend.score_continuation(WARMUP_MESSAGES, "Hello.")
        elif mode == "logprob":
            await backend.next_token_logprobs(WARMUP_MESSAGES, "Score: ", ["1"])
        else:
            await backend.chat(WARMUP_MESSAGES, {"temperature": 0.0, "max_tokens": 1})
    except BtkitError:  # a setup problem: the same message the first item would stop with
        raise
    except Exception as e:  # BackendError or a backend's own: recorded in the report
        return f"{type(e).__name__}: {e}"
    return None


def report(items: list[Item], run_info: dict[str, Any], *, gold: Path, model: str, pairs: int) -> dict[str, Any]:
    labels = [it.label for it in items]
    scores = [it.score for it in items]
    scored = [i for i, s in enumerate(scores) if s is not None]
    precision, recall = precision_recall([it.kept for it in items], labels)
    by_kind = {}
    for kind in NEGATIVE_KINDS:
        sub = [it for it in items if it.kind in ("gold", kind)]
        if any(it.kind == kind for it in sub):
            by_kind[kind] = _round(roc_auc([it.score for it in sub], [it.label for it in sub]))
    modes = sorted({it.meta.get("curate_mode") for it in items if it.meta.get("curate_mode")})
    return {
        "method_stage": run_info["stage"],
        "mode": modes[0] if len(modes) == 1 else (modes or run_info["mode"]),
        "auto_choice": run_info.get("auto_choice"),
        "model": model,
        "gold": str(gold),
        "pairs": pairs,
        "items": len(items),
        "positives": sum(labels),
        "negatives": {k: sum(1 for it in items if it.kind == k) for k in NEGATIVE_KINDS if any(it.kind == k for it in items)},
        "auc": _round(roc_auc(scores, labels)),
        "auc_scored_only": _round(roc_auc([scores[i] for i in scored], [labels[i] for i in scored])),
        "auc_by_negative": by_kind,
        "threshold": run_info["threshold"],
        "keep_top": run_info["keep_top"],
        "keep_top_cutoff": run_info["keep_top_cutoff"],
        "precision": _round(precision),
        "recall": _round(recall),
        "kept": sum(it.kept for it in items),
        "scored": len(scored),
        "scored_share": _round(len(scored) / len(items)) if items else None,
        "errors": _count(it.error for it in items if it.error),
        "seconds_per_item": _round(run_info["wall_s"] / len(items)) if items else None,
        "wall_s": _round(run_info["wall_s"]),
        "warmup_s": _round(run_info["warmup_s"]),
        "warmup_error": run_info["warmup_error"],
        "cache_hits": run_info["cache_hits"],
        "model_calls": run_info["model_calls"],
        "items_from_cache": run_info["items_from_cache"],
        "item_scores": [{"id": it.id, "kind": it.kind, "label": it.label, "score": it.score, "kept": it.kept,
                         **{k: it.meta[k] for k in ITEM_PARTS if it.meta.get(k) is not None}} for it in items],
    }


def _count(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = v.split(":", 1)[0]
        out[key] = out.get(key, 0) + 1
    return out


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def format_table(results: list[dict[str, Any]]) -> str:
    """One Markdown row per mode, then AUC by negative kind and call counts."""
    def f(x: Any) -> str:
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    first = results[0]
    negs = ", ".join(f"{k} {v}" for k, v in first["negatives"].items())
    lines = [
        f"judge {first['method_stage']} model={first['model']} gold={first['gold']} "
        f"({first['pairs']} pairs, {first['items']} items; negatives: {negs})",
        "",
        "| mode | AUC | AUC (scored only) | precision | recall | keep rule | scored | s/item |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rule = (f"top {r['keep_top']:g}% (score >= {f(r['keep_top_cutoff'])})" if r["keep_top"] is not None
                else f"score >= {f(r['threshold'])}")
        lines.append(f"| {r['mode']} | {f(r['auc'])} | {f(r['auc_scored_only'])} | {f(r['precision'])} | {f(r['recall'])} | {rule} | "
                     f"{r['scored']}/{r['items']} ({f(r['scored_share'])}) | {f(r['seconds_per_item'])} |")
    lines.append("")
    for r in results:
        by_kind = ", ".join(f"{k} {f(v)}" for k, v in r["auc_by_negative"].items()) or "-"
        unscored = f"; unscored: {', '.join(f'{k} {v}' for k, v in r['errors'].items())}" if r["errors"] else ""
        lines.append(f"{r['mode']}: AUC by negative kind: {by_kind}; {r['model_calls']} model calls, "
                     f"{r['cache_hits']} cache hits ({r['items_from_cache']}/{r['items']} items answered whole by the cache), "
                     f"{f(r['wall_s'])} s after a {f(r['warmup_s'])} s warm-up{unscored}")
        if r.get("auto_choice"):
            lines.append(r["auto_choice"])
        if r["warmup_error"]:
            lines.append(f"{r['mode']}: warm-up call failed ({r['warmup_error']}): s/item includes model loading")
    return "\n".join(lines)


@click.command("eval-judge")
@click.argument("gold", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", default="humpback", show_default=True, help="Method whose pair-scoring curate stage is the judge (e.g. humpback, backforth).")
@click.option("--stage", "stage_name", default=None, help="The stage to evaluate (default: the method's first stage that scores (instruction, response) pairs).")
@click.option("--judge-mode", "modes", type=JudgeModeType(), multiple=True,
              help="Judge mode (auto, rubric, logprob, pmi, ifd, complete); repeat to compare modes (default: auto, what a run would pick).")
@click.option("--mode", "former_modes", type=JudgeModeType("--mode", "--judge-mode"), multiple=True, hidden=True, help="Deprecated: use --judge-mode.")
@click.option("--model", default=None, help="Model spec (default: the embedded SmolLM2-135M).")
@click.option("--base-url", default=None, help="Endpoint for remote backends (default for openai:/vllm: OPENAI_BASE_URL).")
@click.option("-B", "--backend-option", "backend_option", multiple=True, metavar="KEY=VALUE", help="Backend option (e.g. -B n_ctx=8192).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use the first N gold pairs.")
@click.option("--negatives", default=",".join(NEGATIVE_KINDS), show_default=True,
              help=f"Negative kinds to build, comma-separated: swapped (another pair's instruction), truncated (only the "
                   f"first {TRUNCATE_SHARE:.0%} of the response's words), text_ref (an instruction pointing at 'the text').")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the derangement and the choice of text-pointing instructions.")
@click.option("--threshold", type=click.IntRange(1, 5), default=None, help="Rubric threshold (rubric/logprob modes; default: the stage's, 5).")
@click.option("--score-threshold", type=SCORE, default=None, help="Keep score >= X (pmi/ifd default 0).")
@click.option("--keep-top", type=PERCENT, default=None, help="Keep the top P percent of scored items instead of a threshold.")
@click.option("--prompts", "prompts_dir", multiple=True, type=click.Path(file_okay=False, path_type=Path), help="Template override folder.")
@click.option("--concurrency", type=CONCURRENCY, default=8, show_default=True)
@click.option("--no-cache", is_flag=True, help="Do not read or write the model-call cache (honest timings; the report counts items_from_cache).")
@click.option("--cache", "cache_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None, help="Write the report as JSON here ('-': stdout instead of the table).")
def eval_judge_command(gold: Path, method: str, stage_name: str | None, modes: tuple[str, ...], former_modes: tuple[str, ...], model: str | None, base_url: str | None,
                       backend_option: tuple[str, ...], limit: int | None, negatives: str, seed: int, threshold: int | None,
                       score_threshold: float | None, keep_top: float | None, prompts_dir: tuple[Path, ...], concurrency: int,
                       no_cache: bool, cache_path: Path | None, json_out: Path | None) -> None:
    """Measure a curate stage on gold pairs and built negatives: ROC AUC, precision/recall, scored share, s/item."""
    import asyncio

    from btkit import DEFAULT_MODEL
    from btkit.config import parse_key_values
    from btkit.plugins import get_registry

    results = []
    modes = modes + former_modes  # --mode: the former name of --judge-mode (warned when read)
    try:
        kinds = [k.strip() for k in negatives.split(",") if k.strip()]
        pairs = load_gold(gold, limit)
        backend_options = parse_key_values(backend_option, "--backend-option")
        if base_url:  # else openai:/vllm: read OPENAI_BASE_URL themselves; other backends never do
            backend_options["base_url"] = base_url
        spec = model or DEFAULT_MODEL
        for mode in modes or ("auto",):
            items = build_items(pairs, seed, kinds)
            options: dict[str, Any] = {"judge_mode": mode}
            for key, value in (("threshold", threshold), ("score_threshold", score_threshold), ("keep_top", keep_top)):
                if value is not None:
                    options[key] = value
            info = asyncio.run(score_items(
                items, registry=get_registry(), gold=gold, method=method, stage_name=stage_name, model=spec,
                stage_options=options, backend_options=backend_options, prompt_overrides=list(prompts_dir),
                cache_path=cache_path, use_cache=not no_cache, concurrency=concurrency,
            ))
            results.append(report(items, info, gold=gold, model=spec, pairs=len(pairs)))
    except BtkitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    payload: Any = results[0] if len(results) == 1 else {"modes": results}
    text = json.dumps(payload, indent=2)
    if json_out is not None and str(json_out) == "-":
        click.echo(text)
        return
    click.echo(format_table(results))
    if json_out is not None:
        json_out.write_text(text + "\n", encoding="utf-8")


@hookimpl
def btkit_register_commands(cli: Any) -> None:
    cli.add_command(eval_judge_command)

"""Cycle-Instruct's self-training loop (arXiv 2508.16100): two generators trained on each other's outputs, no seed.

The method (:mod:`btkit_plugins.methods.cycle_instruct`) supplies the stages, the segmentation and the
training rows; this module only orders them into rounds. Every step is a folder of the loop
directory, done once (see :mod:`.steps`):

- ``split``: the corpus (its first ``--limit`` documents) split into ``split/train.jsonl`` and
  ``split/held-back.jsonl``. A document is held back by a stable hash of its id and ``--split-seed``
  (never by position), so the split never changes between rounds or re-runs: ``--held-back N`` (a
  whole number >= 1) holds back the N documents of smallest hash; ``--held-back F`` (0 < F < 1) each
  document whose hash falls below F (at least one). A document without an id gets ``line{n}``, the id
  a btkit run gives it. Held-back documents are only ever evaluated on, never trained on.
- ``round0-eval``: the base model as both generators (Q_0 = A_0 = the base), measured on the
  held-back segments, so the table starts from where training started.
- for r = 1..R:

  - ``round{r}-run``: a cycle_instruct run (``question`` then ``answer``) over the training
    documents, with the question generator Q_{r-1} and the answer generator A_{r-1} (a model per
    stage). Questions are sampled (temperature 0.7, top-p 0.9, ``--sample-seed``), answers greedy.
  - ``round{r}-answerer``: A_r trained on (generated question -> the real segment), the rows of
    :func:`answer_training_pair`.
  - ``round{r}-questioner``: Q_r trained on (A_{r-1}'s answer to a generated question -> that
    question), the rows of :func:`question_training_pair`: the cycle.
  - ``round{r}-eval``: Q_r writes a question for each held-back segment (greedy), A_r answers it
    without seeing the segment (greedy), and A_r scores the segment given the question (the
    method's ``score`` stage). Figures: mean ROUGE-L of the reconstruction against the segment, and
    the mean continuation-likelihood gain, mean log P(segment | question) - mean log P(segment) in
    nats per token (btkit's pmi).

Both rows are in exactly the frame each stage prompts in, so a trained model is used as it was
trained. Each round's generators continue from the previous round's (``--from-base``: each is
trained from the base model instead, on that round's rows only). The base model is used through its
Hugging Face copy (``transformers:`` for every round, the base included, so all rounds are measured
by the same backend and precision), on the device the training uses (``--device``; auto: the GPU
when there is one).

``LOOP/report.json`` holds per round the models (spec and sha256), the rows each was trained on,
its training loss, the training run's counts and mean ROUGE-L, and the held-back figures. The number
of rounds is not a setting of the loop directory: ``--rounds 3`` on a finished 2-round loop runs
round 3 only.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path
from typing import Any, Callable

import click

from btkit.errors import BtkitError
from btkit.io import iter_jsonl
from btkit.options import INPUT_DEFAULTS, MAX_WORDS, MIN_WORDS

from ..base_model import hf_model_dir, model_digest
from ..data import chat_row
from ..sft import TrainSettings, train_model
from .steps import LoopDirectory, read_jsonl, run_stages

LOOP = "cycle_instruct"
SPLIT = "split"
TRAIN_FILE = "train.jsonl"
HELD_BACK_FILE = "held-back.jsonl"
#: Decoding of the generators in the loop's runs (the method's defaults, lengths set by the loop).
QUESTION_TEMPERATURE, QUESTION_TOP_P = 0.7, 0.9


def _method() -> Any:
    """The method's public helpers (the loop uses nothing private of it)."""
    from btkit_plugins.methods import cycle_instruct

    return cycle_instruct


# -- the held-back split ---------------------------------------------------------------------------
def _share(doc_id: str, split_seed: int) -> float:
    """Where a document falls in [0, 1): a stable hash of its id and the split seed."""
    digest = hashlib.sha256(f"btkit-{LOOP}-held-back\0{split_seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _documents(corpus: Path, limit: int | None, id_field: str) -> Any:
    """``(id, row)`` of the corpus's first ``limit`` rows; a row without an id gets ``line{n}`` (as a run names it)."""
    for n, (_, row) in enumerate(iter_jsonl(corpus), start=1):
        if limit is not None and n > limit:
            return
        if row.get(id_field) in (None, ""):
            row = {**row, id_field: f"line{n}"}
        yield str(row[id_field]), row


def split_corpus(corpus: Path, folder: Path, held_back: float, split_seed: int = 0, limit: int | None = None,
                 id_field: str = INPUT_DEFAULTS["id_field"]) -> dict[str, Any]:
    """Write ``folder/train.jsonl`` and ``folder/held-back.jsonl``; returns the counts and held-back ids.

    ``held_back`` >= 1 (whole): that many documents, those of smallest hash; 0 < ``held_back`` < 1:
    every document whose hash share is below it, and at least one. Two passes over the corpus, with
    memory for the held-back ids only.
    """
    if held_back >= 1:
        if held_back != int(held_back):
            raise BtkitError(f"--held-back {held_back}: a number of documents must be whole (or a share below 1)")
        held = {doc for _, doc in heapq.nsmallest(int(held_back), ((_share(d, split_seed), d) for d, _ in _documents(corpus, limit, id_field)))}
    elif held_back > 0:
        held, first = set(), None
        for doc, _ in _documents(corpus, limit, id_field):
            share = _share(doc, split_seed)
            if share < held_back:
                held.add(doc)
            if first is None or share < first[0]:
                first = (share, doc)
        if not held and first is not None:
            held.add(first[1])
    else:
        raise BtkitError(f"--held-back must be > 0 (got {held_back}): the loop is measured on held-back documents")
    counts = {"train": 0, "held_back": 0}
    tmp = {name: folder / f".{name}.tmp" for name in (TRAIN_FILE, HELD_BACK_FILE)}
    with open(tmp[TRAIN_FILE], "w", encoding="utf-8") as train, open(tmp[HELD_BACK_FILE], "w", encoding="utf-8") as back:
        for doc, row in _documents(corpus, limit, id_field):
            out, key = (back, "held_back") if doc in held else (train, "train")
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[key] += 1
    if counts["train"] == 0:
        raise BtkitError(f"{corpus}: every one of its {counts['held_back']} documents is held back; lower --held-back or raise --limit")
    for name, path in tmp.items():
        os.replace(path, folder / name)
    return {"documents": counts["train"] + counts["held_back"], "train_documents": counts["train"],
            "held_back_documents": counts["held_back"], "held_back_ids": sorted(held)}


# -- steps -------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _figures(folder: Path, key: str) -> list[float]:
    """``meta[key]`` of the kept pairs of a run directory (those that have a number there)."""
    values = []
    for row in read_jsonl(folder / "data.jsonl") if (folder / "data.jsonl").is_file() else []:
        value = (row.get("meta") or {}).get(key)
        if isinstance(value, (int, float)) and value == value:
            values.append(float(value))
    return values


def run_summary(folder: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Counts, drops and the mean ROUGE-L of a round's cycle_instruct run (the training side)."""
    return {"segments": stats.get("units", 0), "kept": stats.get("kept", 0), "dropped": stats.get("dropped", 0),
            "drops": stats.get("dropped_by_reason", {}), "rouge_l": _mean(_figures(folder, "rouge_l"))}


def generation_options(train: TrainSettings) -> dict[str, Any]:
    """Backend options of the loop's runs: the generators run where the training runs, so a GPU box
    generates on its GPU with the same command (``transformers:`` runs on the CPU unless told)."""
    device = train.device
    if device == "auto":
        try:
            import torch
        except ImportError:  # training will say what is missing
            return {}
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"device": device} if device != "cpu" else {}


def _eval_summary(folder: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """A run summary with the mean likelihood gain, and what charges failures: ROUGE-L over every
    segment that reached the question stage (a segment with no question or no answer counts 0),
    and each segment's figures."""
    summary = run_summary(folder, stats)
    gains = _figures(folder, "gain")
    summary.update(gain=_mean(gains), scored=len(gains))
    per_segment, measured = [], 0
    for line in read_jsonl(folder / "candidates.jsonl"):
        if line.get("dropped_at") == f"{LOOP}.segment":  # too short / duplicate: never a held-back measurement
            continue
        measured += 1
        meta, fields = line.get("meta") or {}, line.get("fields") or {}
        per_segment.append({"id": line.get("id"), "status": line.get("status"), "reason": line.get("reason"),
                            "question": fields.get("instruction") if line.get("dropped_at") != f"{LOOP}.question" else None,
                            "rouge_l": meta.get("rouge_l"), "gain": meta.get("gain")})
    total = sum(float(s["rouge_l"]) for s in per_segment if isinstance(s["rouge_l"], (int, float)) and s["status"] == "kept")
    summary["rouge_l_all"] = round(total / measured, 6) if measured else None
    summary["measured"] = measured
    summary["per_segment"] = per_segment
    return summary


def _as_row(pair: dict[str, str]) -> dict[str, Any]:
    """A method training pair ({instruction, response, system}) as an SFT row."""
    return chat_row(pair["instruction"], pair["response"], pair.get("system") or None)


def training_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(answerer rows, questioner rows) from a round's run: (question -> segment) and (reconstruction -> question)."""
    method = _method()
    answerer, questioner = [], []
    for row in read_jsonl(run_dir / "data.jsonl"):
        question, segment = row["instruction"], row["response"]
        meta = row.get("meta") or {}
        segment = meta.get("segment") or segment  # the method keeps the segment in meta when a stage rewrote the response
        answerer.append(_as_row(method.answer_training_pair(question, segment)))
        reconstruction = meta.get("reconstruction")
        if isinstance(reconstruction, str) and reconstruction.strip():
            questioner.append(_as_row(method.question_training_pair(reconstruction, question)))
    return answerer, questioner


def run_cycle_instruct_loop(registry: Any, corpus: Path, loop_dir: Path, *, rounds: int = 2, held_back: float = 0.1,
                            split_seed: int = 0, base: str | None = None, train: TrainSettings | None = None,
                            question_tokens: int = 128, answer_tokens: int = 512, sample_seed: int = 0,
                            parse_retries: int = 2, min_words: int | None = None, max_words: int | None = None,
                            max_copied_words: int | None = None, from_base: bool = False, limit: int | None = None,
                            concurrency: int | None = None, quiet: bool = False, overwrite: bool = False,
                            cache_path: Path | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Run (or resume, or extend by rounds) the loop in ``loop_dir``; returns the report (also ``LOOP/report.json``)."""
    if rounds < 1:
        raise BtkitError(f"--rounds must be >= 1 (got {rounds})")
    train = train or TrainSettings()
    method = _method()
    registry.method(method.NAME)  # the method is registered (a clear error if not)
    settings = {"corpus": str(corpus), "held_back": held_back, "split_seed": split_seed, "limit": limit,
                "base": str(base) if base is not None else "default", "train": train.identity(), "from_base": from_base,
                "question_tokens": question_tokens, "answer_tokens": answer_tokens, "sample_seed": sample_seed,
                "parse_retries": parse_retries, "min_words": min_words, "max_words": max_words,
                "max_copied_words": max_copied_words}  # not rounds: more rounds extend a finished loop
    loop = LoopDirectory(loop_dir, LOOP, settings, overwrite=overwrite, quiet=quiet)
    run_options = {k: v for k, v in {"min_words": min_words, "max_words": max_words}.items() if v is not None}
    question_extra = {"max_copied_words": max_copied_words} if max_copied_words is not None else {}

    split = loop.step(SPLIT, lambda folder: split_corpus(corpus, folder, held_back, split_seed, limit))
    train_docs, held_docs = loop.path(SPLIT) / TRAIN_FILE, loop.path(SPLIT) / HELD_BACK_FILE

    def stages(questioner: str, answerer: str, *, evaluate: bool) -> list[dict[str, Any]]:
        question = {"use": f"{LOOP}.question", "model": questioner, "max_tokens": question_tokens, "sample_seed": sample_seed,
                    "parse_retries": parse_retries, **question_extra}
        if evaluate:  # greedy questions: a round's figures differ by its models, not by sampling
            question.update(temperature=0.0)
        else:
            question.update(temperature=QUESTION_TEMPERATURE, top_p=QUESTION_TOP_P)
        out = [question, {"use": f"{LOOP}.answer", "model": answerer, "temperature": 0.0, "max_tokens": answer_tokens}]
        if evaluate:
            out.append({"use": f"{LOOP}.score", "model": answerer})
        return out

    def run(questioner: dict[str, Any], answerer: dict[str, Any], evaluate: bool) -> Callable[[Path], dict[str, Any]]:
        def go(folder: Path) -> dict[str, Any]:
            stats = run_stages(registry, stages(questioner["model"], answerer["model"], evaluate=evaluate),
                                backend_options=generation_options(train), input=held_docs if evaluate else train_docs,
                                out_dir=folder, options=run_options, concurrency=concurrency, quiet=quiet,
                                cache_path=cache_path, use_cache=use_cache)
            figures = _eval_summary(folder, stats) if evaluate else run_summary(folder, stats)
            return {"questioner": questioner["model"], "questioner_sha256": questioner["model_sha256"],
                    "answerer": answerer["model"], "answerer_sha256": answerer["model_sha256"], **figures}
        return go

    def trainer(rows: list[dict[str, Any]], start: dict[str, Any], what: str) -> Callable[[Path], dict[str, Any]]:
        def go(folder: Path) -> dict[str, Any]:
            if not rows:
                raise BtkitError(f"{folder}: no rows to train the {what} on: the round's run kept no pair "
                                 f"(see its stats.json); raise --limit, --parse-retries or --question-tokens")
            t = train_model(rows, folder, base=start["model"], settings=train, quiet=quiet)
            return {"model": f"transformers:{folder}", "model_sha256": t["model_sha256"], "trained_from": start["model"],
                    "trained_from_sha256": start["model_sha256"], "rows": t["rows"], "rows_used": t.get("rows_used"),
                    "train_loss": t["train_loss"], "losses": t["losses"], "steps": t["steps"], "tokens_per_s": t.get("tokens_per_s")}
        return go

    # round 0: the base model as both generators (recorded in the eval step, so a re-run loads nothing)
    def base_eval(folder: Path) -> dict[str, Any]:
        path = hf_model_dir(base)  # a GGUF base: its HF copy, made once
        b = {"model": f"transformers:{path}", "model_sha256": model_digest(path)}
        return run(b, b, True)(folder)

    evals = [loop.step("round0-eval", base_eval)]
    start = {"model": evals[0]["questioner"], "model_sha256": evals[0]["questioner_sha256"]}
    questioner, answerer = dict(start), dict(start)
    report_rounds = [_round_entry(0, None, questioner, answerer, None, None, evals[0])]
    loop.say(_line(report_rounds[-1]))

    def write(final: bool = False) -> dict[str, Any]:
        report = {"split": {k: v for k, v in split.items() if k != "step_wall_s"}, "base": start, "rounds": report_rounds}
        if final:
            report.update(final_questioner=questioner["model"], final_questioner_sha256=questioner["model_sha256"],
                          final_answerer=answerer["model"], final_answerer_sha256=answerer["model_sha256"])
        loop.write_report(report)
        return report

    write()
    for r in range(1, rounds + 1):
        generated = loop.step(f"round{r}-run", run(questioner, answerer, False))
        run_dir = loop.path(f"round{r}-run")
        rows: dict[str, list[dict[str, Any]]] = {}

        def rows_of(which: int) -> list[dict[str, Any]]:
            if not rows:
                rows["a"], rows["q"] = training_rows(run_dir)
            return rows["a" if which == 0 else "q"]

        new_answerer = loop.step(f"round{r}-answerer", lambda f: trainer(rows_of(0), start if from_base else answerer, "answer generator")(f))
        new_questioner = loop.step(f"round{r}-questioner", lambda f: trainer(rows_of(1), start if from_base else questioner, "question generator")(f))
        questioner, answerer = _model(new_questioner), _model(new_answerer)
        evaluated = loop.step(f"round{r}-eval", run(questioner, answerer, True))
        report_rounds.append(_round_entry(r, generated, questioner, answerer, new_questioner, new_answerer, evaluated))
        loop.say(_line(report_rounds[-1]))
        write()
    return write(final=True)


def _model(summary: dict[str, Any]) -> dict[str, Any]:
    """A trained generator as the loop uses it: its spec and the digest its training recorded (the
    folder's :func:`model_digest`, which leaves out btkit's own files such as ``step.json``)."""
    return {"model": summary["model"], "model_sha256": summary["model_sha256"]}


def _round_entry(r: int, generated: dict[str, Any] | None, questioner: dict[str, Any], answerer: dict[str, Any],
                 q_train: dict[str, Any] | None, a_train: dict[str, Any] | None, evaluated: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"round": r, "questioner": questioner["model"], "questioner_sha256": questioner["model_sha256"],
                             "answerer": answerer["model"], "answerer_sha256": answerer["model_sha256"]}
    if generated is not None:
        entry["run"] = {"questioner": generated["questioner"], "answerer": generated["answerer"], "segments": generated["segments"],
                        "kept": generated["kept"], "dropped": generated["dropped"], "drops": generated["drops"],
                        "rouge_l": generated["rouge_l"]}
    if q_train is not None and a_train is not None:
        entry["training"] = {
            name: {"rows": t["rows"], "rows_used": t.get("rows_used"), "steps": t["steps"], "train_loss": t["train_loss"],
                   "trained_from": t["trained_from"]}
            for name, t in (("answerer", a_train), ("questioner", q_train))}
    entry["held_back"] = {k: evaluated.get(k) for k in ("segments", "measured", "kept", "rouge_l", "rouge_l_all", "gain", "scored", "drops")}
    return entry


def _fmt(value: Any, sign: bool = False) -> str:
    return "n/a" if value is None else (f"{value:+.4f}" if sign else f"{value:.4f}")


def _line(entry: dict[str, Any]) -> str:
    h = entry["held_back"]
    models = "base" if entry["round"] == 0 else f"Q{entry['round']}/A{entry['round']}"
    return (f"round {entry['round']} ({models}) held back: ROUGE-L {_fmt(h['rouge_l'])} (all {_fmt(h['rouge_l_all'])}), "
            f"gain {_fmt(h['gain'], sign=True)} nats/token, {h['kept']}/{h['measured']} segments answered")


# -- the command ----------------------------------------------------------------------------------
class HeldBack(click.ParamType):
    """A number of documents (whole, >= 1) or a share of them (0 < F < 1)."""

    name = "N|F"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of documents or a share", param, ctx)
        if not (v > 0) or v != v or v == float("inf") or (v >= 1 and v != int(v)):
            self.fail(f"{value!r}: give a whole number of documents (>= 1) or a share between 0 and 1", param, ctx)
        return v


@click.command(LOOP)
@click.argument("corpus", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--rounds", type=click.IntRange(1, 20), default=2, show_default=True, help="Rounds of generate, train both generators, evaluate (more rounds extend a finished loop).")
@click.option("--held-back", type=HeldBack(), default=0.1, show_default=True, help="Documents held back for evaluation only: a whole number N (the N of smallest id hash) or a share F < 1 (at least one).")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the held-back hash (the split never changes between rounds).")
@click.option("--question-tokens", type=click.IntRange(1), default=128, show_default=True, help="Length cap of a generated question.")
@click.option("--answer-tokens", type=click.IntRange(1), default=512, show_default=True, help="Length cap of a reconstruction (a cut one is kept; ROUGE-L charges what is missing).")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Sampling seed of the question calls.")
@click.option("--parse-retries", type=click.IntRange(0), default=2, show_default=True, help="Re-sample a question that fails to parse (copies its segment, a refusal, ...) up to N times.")
@click.option("--min-words", type=MIN_WORDS, default=None, help="Drop segments shorter than this (default: the method's, 30).")
@click.option("--max-words", type=MAX_WORDS, default=None, help="Pack paragraphs into segments of at most this many words (default: the method's, 400).")
@click.option("--max-copied-words", type=click.IntRange(0), default=None, help="A question repeating more consecutive words of its segment is a parse failure (default: the method's, 12; 0: no check).")
@click.option("--from-base", is_flag=True, help="Train each round's generators from the base model (default: continue from the previous round's).")
def loop_cycle_instruct(corpus: Path, out_dir: Path, **params: Any) -> None:
    """Cycle-Instruct, seed-free: Q_{r-1} asks, A_{r-1} answers; A_r learns question -> real segment, Q_r learns answer -> question; held-back ROUGE-L and likelihood gain per round."""
    from ..commands import _finish, _registry, train_settings

    base = params.pop("base")
    settings = train_settings(params)
    report = run_cycle_instruct_loop(
        _registry(), corpus, out_dir, rounds=params["rounds"], held_back=params["held_back"], split_seed=params["split_seed"],
        base=base, train=settings, question_tokens=params["question_tokens"], answer_tokens=params["answer_tokens"],
        sample_seed=params["sample_seed"], parse_retries=params["parse_retries"], min_words=params["min_words"],
        max_words=params["max_words"], max_copied_words=params["max_copied_words"], from_base=params["from_base"],
        limit=params["limit"], concurrency=params["concurrency"], quiet=params["quiet"], overwrite=params["overwrite"],
        cache_path=params["cache_path"], use_cache=not params["no_cache"])
    _finish(report, out_dir)

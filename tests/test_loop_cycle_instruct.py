"""``btkit loop cycle_instruct``: the held-back split (stable, by id hash), the training rows in the
stages' own prompts, and the loop end to end on CPU from the embedded model with tiny settings: round
2's generations come from round 1's models (lineage names their folders, the report's sha256 is the
folders' digest), each round's models load and score differently from the last, and a re-run
recomputes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btkit.errors import BtkitError
from btkit_plugins.methods.cycle_instruct import answer_prompt, question_prompt
from btkit_plugins.train.loops.cycle_instruct import split_corpus, training_rows

from conftest import EXAMPLES, read_jsonl, words, write_jsonl

STEPS = ["split", "round0-eval", "round1-run", "round1-answerer", "round1-questioner", "round1-eval",
         "round2-run", "round2-answerer", "round2-questioner", "round2-eval"]


# -- without a model -------------------------------------------------------------------------------
def split(tmp_path: Path, name: str, docs: list[dict], held_back: float, **kw) -> tuple[list[str], list[str], dict]:
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", docs)
    folder = tmp_path / name
    folder.mkdir()
    summary = split_corpus(corpus, folder, held_back, **kw)
    ids = lambda f: [row["id"] for row in read_jsonl(folder / f)]  # noqa: E731
    return ids("train.jsonl"), ids("held-back.jsonl"), summary


def test_held_back_documents_are_chosen_by_id_hash_not_position(tmp_path):
    docs = [{"id": f"doc{i}", "text": words(40, i)} for i in range(20)]
    train, held, summary = split(tmp_path, "a", docs, 3)
    assert len(held) == 3 and len(train) == 17 and set(held) | set(train) == {d["id"] for d in docs}
    assert summary["held_back_ids"] == sorted(held) and summary["train_documents"] == 17
    # the same documents in another order hold back the same ones; another seed others
    assert set(split(tmp_path, "b", docs[::-1], 3)[1]) == set(held)
    assert set(split(tmp_path, "c", docs, 3, split_seed=1)[1]) != set(held)
    # a share: each document decides alone, so more documents never move one across
    _, held_some, _ = split(tmp_path, "d", docs, 0.3)
    _, held_more, _ = split(tmp_path, "e", docs + [{"id": f"new{i}", "text": words(40)} for i in range(20)], 0.3)
    assert set(held_some) == {d for d in held_more if d.startswith("doc")}
    # a tiny share still holds back one document; --limit reads the first N; no id: line{n}, as a run names it
    assert len(split(tmp_path, "f", docs, 0.0001)[1]) == 1
    train, held, _ = split(tmp_path, "g", [{"text": words(40, i)} for i in range(5)], 1, limit=4)
    assert sorted(train + held) == ["line1", "line2", "line3", "line4"]
    with pytest.raises(BtkitError, match="every one"):
        split(tmp_path, "h", docs[:2], 2)


def test_training_rows_are_the_prompts_the_stages_send(tmp_path):
    seg, q, rec = words(40), "What do the Greek letters stand for?", "They stand for numbers."
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": q, "response": seg, "meta": {"reconstruction": rec}}])
    [a_row], [q_row] = training_rows(tmp_path)
    assert a_row == {"prompt": answer_prompt(q).messages, "completion": [{"role": "assistant", "content": seg}]}
    assert q_row == {"prompt": question_prompt(rec).messages, "completion": [{"role": "assistant", "content": q}]}


def test_generation_runs_where_training_runs(registry, scripted, tmp_path):
    """On a GPU box the runs pass device=cuda to their backends (through run_stages' backend options)."""
    from btkit_plugins.train.loops.cycle_instruct import generation_options
    from btkit_plugins.train.loops.steps import run_stages
    from btkit_plugins.train.sft import TrainSettings

    assert generation_options(TrainSettings(device="cpu")) == {} and generation_options(TrainSettings(device="cuda")) == {"device": "cuda"}
    backend, spec = scripted(default=lambda m, p: "What do the Greek letters stand for?" if m[0]["role"] == "system" else "Numbers.")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(40)}])
    stats = run_stages(registry, [{"use": "cycle_instruct.question", "model": spec}, {"use": "cycle_instruct.answer", "model": spec}],
                       backend_options={"device": "cuda"}, input=corpus, out_dir=tmp_path / "run", quiet=True)
    assert stats["kept"] == 1 and len(backend.history) == 2
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fingerprint"]["backend_options"] == {"device": "cuda"}


def test_held_back_option_refuses_what_is_neither_a_count_nor_a_share(cli, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "d0", "text": words(40)}])
    for bad in ("0", "-1", "2.5", "nan", "x"):
        r = cli("loop", "cycle_instruct", corpus, "-o", tmp_path / "loop", "--held-back", bad)
        assert r.exit_code == 2 and "--held-back" in r.output, (bad, r.output)
    assert not (tmp_path / "loop").exists()


# -- the embedded model ---------------------------------------------------------------------------
def short_corpus(path: Path, n: int = 4) -> Path:
    """The first ``n`` documents of examples/corpus.jsonl, each cut to its first paragraph (40-75
    words: one segment each, and short training rows)."""
    docs = []
    for row in read_jsonl(EXAMPLES / "corpus.jsonl")[:n]:
        docs.append({**row, "text": row["text"].split("\n\n")[0]})
    assert all(30 <= len(d["text"].split()) <= 80 for d in docs)
    return write_jsonl(path, docs)


def step_files(loop: Path) -> dict[str, tuple[str, int]]:
    return {p.parent.name: (p.read_text(), p.stat().st_mtime_ns) for p in loop.glob("*/step.json")}


@pytest.mark.model
@pytest.mark.slow
def test_loop_end_to_end_round_two_uses_round_one_models_and_a_rerun_recomputes_nothing(tmp_path, hf_base):
    from btkit_plugins.train.base_model import model_digest

    corpus = short_corpus(tmp_path / "corpus.jsonl")
    loop = tmp_path / "loop"
    cmd = [sys.executable, "-m", "btkit.cli", "loop", "cycle_instruct", str(corpus), "-o", str(loop), "--base", str(hf_base),
           "--rounds", "2", "--held-back", "1", "--question-tokens", "40", "--answer-tokens", "32",
           "--max-steps", "1", "--batch-size", "1", "--max-length", "256", "--lora-r", "8", "--lr", "1e-3"]
    # one torch thread: on this 2-core machine shared with other work (2026-12-02) one training step
    # took 10 s with 1 thread and 42 s with torch's default of 2 (OpenMP threads spin-wait)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.monotonic()
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    wall = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-3000:]
    print(f"first run {wall:.0f} s\n" + "\n".join(line for line in first.stderr.splitlines() if "held back:" in line))
    assert sorted(step_files(loop)) == sorted(STEPS)

    report = json.loads((loop / "report.json").read_text())
    base = f"transformers:{hf_base}"
    assert report["loop"] == "cycle_instruct" and [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["split"]["train_documents"] == 3 and report["split"]["held_back_documents"] == 1
    r0, r1, r2 = report["rounds"]
    assert r0["questioner"] == r0["answerer"] == base and r0["questioner_sha256"] == model_digest(hf_base)
    digests = {model_digest(hf_base)}
    for r in (r1, r2):
        n = r["round"]
        for role, folder in (("questioner", loop / f"round{n}-questioner"), ("answerer", loop / f"round{n}-answerer")):
            assert r[role] == f"transformers:{folder}" and r[role + "_sha256"] == model_digest(folder), (n, role)
            digests.add(r[role + "_sha256"])
        assert r["training"]["answerer"]["steps"] == r["training"]["questioner"]["steps"] == 1
        held = r["held_back"]
        assert held["segments"] == 1 and (held["rouge_l"] is None or 0.0 <= held["rouge_l"] <= 1.0)
    assert len(digests) == 5  # the base, and four different trained models
    # each round generates with the previous round's models, and continues training them
    assert (r1["run"]["questioner"], r1["run"]["answerer"]) == (base, base)
    assert (r2["run"]["questioner"], r2["run"]["answerer"]) == (r1["questioner"], r1["answerer"])
    assert r2["training"]["answerer"]["trained_from"] == r1["answerer"] and r2["training"]["questioner"]["trained_from"] == r1["questioner"]
    assert json.loads((loop / "round2-answerer" / "training.json").read_text())["base"] == r1["answerer"]

    # checked, not assumed: the lineage of every call of round 2's run names round 1's model folders
    cands = read_jsonl(loop / "round2-run" / "candidates.jsonl")
    steps = [s for c in cands for s in c["lineage"]]
    assert {s["model"] for s in steps if s["stage"] == "cycle_instruct.question"} == {f"transformers:{loop / 'round1-questioner'}"}
    assert {s["model"] for s in steps if s["stage"] == "cycle_instruct.answer"} == {f"transformers:{loop / 'round1-answerer'}"}
    assert any(s["stage"] == "cycle_instruct.answer" for s in steps)
    for n, models in ((0, (base, base)), (1, (r1["questioner"], r1["answerer"])), (2, (r2["questioner"], r2["answerer"]))):
        for c in read_jsonl(loop / f"round{n}-eval" / "candidates.jsonl"):
            for s in c["lineage"]:
                assert s["model"] == (models[0] if s["stage"] == "cycle_instruct.question" else models[1]), (n, s)

    # round 2 trained on round 2's run, in the stages' own prompts: A on question -> real segment,
    # Q on (A_1's reconstruction -> question)
    pairs = read_jsonl(loop / "round2-run" / "data.jsonl")
    assert pairs
    a_rows, q_rows = read_jsonl(loop / "round2-answerer" / "rows.jsonl"), read_jsonl(loop / "round2-questioner" / "rows.jsonl")
    assert [r["prompt"] for r in a_rows] == [answer_prompt(p["instruction"]).messages for p in pairs]
    assert [r["completion"][0]["content"] for r in a_rows] == [p["response"] for p in pairs]
    assert [r["prompt"] for r in q_rows] == [question_prompt(p["meta"]["reconstruction"]).messages for p in pairs]
    assert [r["completion"][0]["content"] for r in q_rows] == [p["instruction"] for p in pairs]
    held_ids = set(report["split"]["held_back_ids"])
    assert not held_ids & {c["source_id"] for n in (1, 2) for c in read_jsonl(loop / f"round{n}-run" / "candidates.jsonl")}

    # the models differ in what they compute, not only in their bytes: the same held-back segment's
    # unconditional likelihood (no question involved) under A_0, A_1, A_2, where each round scored it
    uncond = {}
    for n in (0, 1, 2):
        for row in read_jsonl(loop / f"round{n}-eval" / "data.jsonl"):
            uncond[n] = row["meta"]["gain_details"]["uncond_logprob"]
    values = list(uncond.values())
    assert len(values) >= 2 and len(set(values)) == len(values), uncond

    # the same command again: every step complete and skipped, nothing rewritten
    before = step_files(loop)
    report_text = (loop / "report.json").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    for step in STEPS:
        assert f"loop cycle_instruct: {step}: complete, skipped" in second.stderr, step
    assert ": running" not in second.stderr and "train: step" not in second.stderr
    assert step_files(loop) == before and (loop / "report.json").read_text() == report_text

"""What one Humpback iteration buys on the embedded model (issue 14, item 6).

Three measurements on the same fixed, seeded sample of gold pairs (examples/gold/faq_pairs.jsonl):

1. the loop itself: ``btkit loop humpback`` with one iteration trains M_yx (backward, on the seed
   pairs reversed), M0 (on the seed) and M1 (on seed + the corpus pairs M_yx wrote and M0 kept);
2. instruction recovery: each gold response goes through a pipeline with only ``humpback.augment``
   (``btkit run``, ``text_field: response``), once per generator, and the generated instruction is
   compared with the real question by ROUGE-L (``btkit.kit.text.rouge_l``), joined by unit id:
   - the base model with the few-shot backward prompt (the seed pairs reversed, default 3 shots),
     ``llamacpp:default``: what ``btkit run humpback`` does without a loop;
   - M_yx zero-shot, ``transformers:LOOP/backward``, exactly as the loop's augment step runs it
     (shots 0, the same seed file, max_tokens, sampling seed; ``plugins/train/loops/humpback.py``);
   - control: the base model zero-shot in ``transformers:`` (the dequantized HF copy M_yx was
     trained from), so the M_yx row differs from it by the training alone (same prompt, backend);
   a generation that failed to parse (cut, copied back, empty) counts as ROUGE-L 0 and is counted;
3. judge AUC: ``btkit eval-judge`` on the same sample (pairs + swapped / truncated / text-pointing
   negatives) in one judge mode for the base model (``llamacpp:default`` and its ``transformers:``
   copy) and for M0 and M1.

Every step resumes: the loop skips finished steps, runs resume, and a finished eval-judge JSON is
reused (delete it to measure again). Run it with a cache directory of its own, e.g.::

    BTKIT_CACHE_DIR=/tmp/h8cache .venv/bin/python benchmarks/loop_gains.py --out /tmp/h8

Prints one table and writes ``OUT/loop_gains.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from btkit.kit.text import rouge_l  # noqa: E402

BTKIT = str(Path(sys.executable).with_name("btkit"))


def sh(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (its output to ``log``), stop on failure; returns wall seconds."""
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"failed ({rc}) after {wall:.0f} s: {' '.join(cmd)}; see {log}")
    return wall


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gold_sample(gold: Path, n: int, seed: int, out: Path) -> list[dict]:
    rows = read_jsonl(gold)
    pick = sorted(random.Random(seed).sample(range(len(rows)), min(n, len(rows))))
    sample = [rows[i] for i in pick]
    with open(out, "w", encoding="utf-8") as f:
        for r in sample:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return sample


def recovery_pipeline(path: Path, sample: Path, seed: Path, shots: int, max_tokens: int, sample_seed: int) -> None:
    """A pipeline of humpback.augment alone over the gold responses (one unit per response)."""
    stage = {"use": "humpback.augment", "seed": str(seed), "shots": shots, "max_tokens": max_tokens, "sample_seed": sample_seed}
    doc = {"name": "recover", "input": str(sample),
           # each gold response whole, as one unit (30-357 words in the shipped set)
           "options": {"text_field": "response", "id_field": "id", "min_words": 0, "max_words": 100000},
           "stages": [stage]}
    path.write_text(json.dumps(doc, indent=2) + "\n")  # JSON is YAML


def recovered(run_dir: Path) -> dict[str, dict]:
    """Unit id -> the generated instruction (or the drop reason) from a run's candidates.jsonl."""
    out = {}
    for c in read_jsonl(run_dir / "candidates.jsonl"):
        if c["id"] == "extra" or c["source_id"] in out:
            continue
        ok = c["status"] == "kept" and c["fields"].get("instruction")
        out[c["source_id"]] = {"instruction": c["fields"]["instruction"] if ok else None,
                               "reason": None if ok else (c.get("reason") or "empty instruction")}
    return out


def stats(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4)} if values else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/h8"))
    ap.add_argument("--corpus", type=Path, default=ROOT / "examples/corpus.jsonl")
    ap.add_argument("--seed-pairs", type=Path, default=ROOT / "examples/seed.jsonl")
    ap.add_argument("--gold", type=Path, default=ROOT / "examples/gold/faq_pairs.jsonl")
    ap.add_argument("--pairs", type=int, default=30, help="gold pairs in the sample")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the gold sample")
    ap.add_argument("--limit", type=int, default=30, help="corpus documents the loop reads")
    ap.add_argument("--judge-mode", default="pmi", help="the loop's curate mode and eval-judge's mode")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64, help="instruction length cap (the loop's default)")
    ap.add_argument("--base-shots", type=int, default=3, help="few-shot examples of the base model's prompt (the stage's default)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every command (0: leave it unset)")
    ap.add_argument("--parallel", type=int, default=2, choices=(1, 2),
                    help="2: measure the base model while the loop trains (two chains of commands at once)")
    args = ap.parse_args()

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    log_a, log_b = out / "loop_gains.log", out / "loop_gains-base.log"
    loads = {"start": load()}
    started = time.monotonic()
    loop_dir = out / "loop"
    commands: dict[str, str] = {}
    walls: dict[str, float | None] = {}

    from plugins.train.base_model import hf_model_dir  # the dequantized HF copy every training starts from

    base_dir = str(hf_model_dir(None))
    sample_path = out / "gold_sample.jsonl"
    sample = gold_sample(args.gold, args.pairs, args.sample_seed, sample_path)
    loop_cmd = [BTKIT, "loop", "humpback", str(args.corpus), "--seed", str(args.seed_pairs), "--iterations", "1",
                "-o", str(loop_dir), "--limit", str(args.limit), "--judge-mode", args.judge_mode,
                "--lora-r", str(args.lora_r), "--lr", str(args.lr), "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--max-tokens", str(args.max_tokens)]
    generators = [("base few-shot", "llamacpp:default", args.base_shots),
                   ("M_yx zero-shot", f"transformers:{loop_dir / 'backward'}", 0),
                   ("base zero-shot (control)", f"transformers:{base_dir}", 0)]
    judges = [("base (llamacpp)", "llamacpp:default"), ("base (transformers copy)", f"transformers:{base_dir}"),
              ("M0", f"transformers:{loop_dir / 'm0'}"), ("M1", f"transformers:{loop_dir / 'm1'}")]

    def recover_cmd(i: int) -> list[str]:
        name, model, shots = generators[i]
        pipe = out / f"recover-{i}.yaml"
        recovery_pipeline(pipe, sample_path, args.seed_pairs.resolve(), shots, args.max_tokens, 0)
        return [BTKIT, "run", str(pipe), "-o", str(out / f"recover-{i}"), "--model", model, "-q"]

    def judge_cmd(i: int) -> list[str]:
        return [BTKIT, "eval-judge", str(sample_path), "--judge-mode", args.judge_mode, "--model", judges[i][1],
                "--json", str(out / f"judge-{i}.json")]

    def step(key: str, cmd: list[str], log: Path, skip: bool = False) -> None:
        commands[key] = " ".join(cmd)
        walls[key] = None if skip else round(sh(cmd, log), 1)

    import threading

    loop_done = threading.Event()

    def chain_a() -> None:  # the loop, then what needs its models
        step("loop", loop_cmd, log_a)
        loop_done.set()
        step("recover: M_yx zero-shot", recover_cmd(1), log_a)
        step("eval-judge: M1", judge_cmd(3), log_a, skip=(out / "judge-3.json").is_file())

    def chain_b() -> None:  # the base model, while the loop trains; M0 last
        step("recover: base few-shot", recover_cmd(0), log_b)
        step("recover: base zero-shot (control)", recover_cmd(2), log_b)
        step("eval-judge: base (llamacpp)", judge_cmd(0), log_b, skip=(out / "judge-0.json").is_file())
        step("eval-judge: base (transformers copy)", judge_cmd(1), log_b, skip=(out / "judge-1.json").is_file())
        loop_done.wait()
        step("eval-judge: M0", judge_cmd(2), log_b, skip=(out / "judge-2.json").is_file())

    errors: list[BaseException] = []

    def guarded(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                loop_done.set()
        return run

    if args.parallel == 2:
        threads = [threading.Thread(target=guarded(chain_a)), threading.Thread(target=guarded(chain_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        guarded(chain_a)()
        guarded(chain_b)()
    if errors:
        sys.exit(f"stopped: {errors[0]}")
    loads["end"] = load()

    report = json.loads((loop_dir / "report.json").read_text())
    steps = {s: json.loads((loop_dir / s / "step.json").read_text()) for s in ("backward", "m0", "curate-m0", "m1")}
    recovery = []
    per_item: dict[str, dict] = {r["id"]: {"id": r["id"], "question": r["instruction"]} for r in sample}
    for i, (name, model, shots) in enumerate(generators):
        got = recovered(out / f"recover-{i}")
        missing = [r["id"] for r in sample if r["id"] not in got]
        if missing:
            sys.exit(f"{out / f'recover-{i}'}: no unit for gold ids {missing[:3]}...")
        scores, failed = [], 0
        for r in sample:
            g = got[r["id"]]
            score = rouge_l(g["instruction"], r["instruction"]) if g["instruction"] else 0.0
            failed += g["instruction"] is None
            scores.append(score)
            per_item[r["id"]][name] = {"instruction": g["instruction"], "reason": g["reason"], "rouge_l": round(score, 4)}
        ok = [s for s, r in zip(scores, sample) if got[r["id"]]["instruction"]]
        recovery.append({"generator": name, "model": model, "shots": shots, "pairs": len(sample), "failed": failed,
                         "rouge_l": stats(scores), "rouge_l_generated_only": stats(ok), "wall_s": walls.get(f"recover: {name}")})
    auc = []
    for i, (name, model) in enumerate(judges):
        r = json.loads((out / f"judge-{i}.json").read_text())
        auc.append({"judge": name, "model": model, "mode": r["mode"], "items": r["items"], "auc": r["auc"],
                    "auc_by_negative": r["auc_by_negative"], "precision": r["precision"], "recall": r["recall"],
                    "scored": r["scored"], "seconds_per_item": r["seconds_per_item"], "wall_s": walls.get(f"eval-judge: {name}")})
    loop_steps_wall = sum(float(v.get("step_wall_s") or 0) for v in steps.values())
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"out": str(out), "base_dir": base_dir},
        "load_avg": loads, "wall_s": round(time.monotonic() - started, 1), "loop_steps_wall_s": round(loop_steps_wall, 1),
        "commands": commands, "command_wall_s": walls,
        "loop": {"report": report, "steps": {k: {x: v.get(x) for x in ("rows", "steps", "train_loss", "tokens_per_s", "step_wall_s", "kept", "dropped", "drops", "scores")} for k, v in steps.items()}},
        "gold_sample": [r["id"] for r in sample],
        "recovery": recovery, "judge_auc": auc, "recovery_items": list(per_item.values()),
    }
    (out / "loop_gains.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    it = report["iterations"][0]
    print(f"loop: M_yx {steps['backward']['rows']} rows, {steps['backward']['steps']} steps, loss {steps['backward']['train_loss']:.3f}; "
          f"M0 {steps['m0']['rows']} rows, loss {steps['m0']['train_loss']:.3f}; curate-m0 kept {it['kept']} dropped {it['dropped']}; "
          f"M1 {it['trained_on']} rows ({it['seed_pairs']} seed), loss {it['train_loss']:.3f}; loop steps {loop_steps_wall:.0f} s")
    print(f"\ninstruction recovery, {len(sample)} gold pairs (sample seed {args.sample_seed}), ROUGE-L vs the real question:\n")
    print("| generator | model | shots | ROUGE-L mean | median | failed | mean of generated |")
    print("|---|---|---|---|---|---|---|")
    for r in recovery:
        print(f"| {r['generator']} | {r['model'].replace(str(out) + '/', 'OUT/')} | {r['shots']} | {f(r['rouge_l'].get('mean'))} | "
              f"{f(r['rouge_l'].get('median'))} | {r['failed']} | {f(r['rouge_l_generated_only'].get('mean'))} |")
    print(f"\njudge AUC, eval-judge --judge-mode {args.judge_mode}, same {len(sample)} pairs ({auc[0]['items']} items):\n")
    print("| judge | model | AUC | swapped / truncated / text_ref | precision | recall | s/item |")
    print("|---|---|---|---|---|---|---|")
    for r in auc:
        k = r["auc_by_negative"]
        print(f"| {r['judge']} | {r['model'].replace(str(out) + '/', 'OUT/')} | {f(r['auc'])} | {f(k.get('swapped'))} / {f(k.get('truncated'))} / "
              f"{f(k.get('text_ref'))} | {f(r['precision'])} | {f(r['recall'])} | {f(r['seconds_per_item'])} |")
    print(f"\nload average (1/5/15 min): {loads}; total {result['wall_s']:.0f} s; JSON: {out / 'loop_gains.json'}")


if __name__ == "__main__":
    main()

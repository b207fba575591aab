"""Training tokens/s: ``btkit train`` (``plugins.train.sft.train_model``) against a bare TRL script.

Both train the same rows (``examples/seed.jsonl`` read as ``btkit train`` reads it, prompt/completion
chat rows), from the same HF model folder (the dequantized embedded SmolLM2-135M that btkit trains
from by default), with the same max_steps, batch, max_length, learning rate, seed and LoRA rank (or
full finetuning with ``--lora-r 0``), on the CPU. The bare script is what one would write with TRL
alone: ``SFTConfig`` with those settings and TRL's defaults for everything else, ``SFTTrainer``,
``trainer.train()``.

Each run is a fresh process (imports done before any clock starts); runs alternate btkit, bare,
btkit, bare, ... Tokens are TRL's own ``num_tokens`` log in both (btkit's ``training.json``
``tokens``; the bare run's last ``log_history`` entry), and tokens/s is over ``trainer.train()``
alone in both (btkit's ``training.json`` ``wall_s`` times exactly that call). btkit's fixed
overhead is reported apart: the time of the whole ``train_model`` call minus its ``train()``
(loading, folder preparation, LoRA merge, saving the model, the two model digests, removing the
checkpoints), next to the bare script's load and set-up time.

    .venv/bin/python benchmarks/bench_train.py --repeats 3 --max-steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


CLOCK: dict[str, float] = {}


def heavy_imports() -> None:
    """Import everything before any clock starts, and time ``SFTTrainer.train`` the same way in both runs.

    The wrapper records the wall time and the process CPU time of the ``train()`` call (btkit's
    ``train_model`` makes that call itself; nothing of btkit is changed). CPU time is the steadier
    figure on a shared machine: other processes stretch the wall clock, not the work done.
    """
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl

    original = trl.SFTTrainer.train

    def timed_train(self, *args, **kwargs):
        w0, c0 = time.monotonic(), time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            CLOCK["train_s"] = time.monotonic() - w0
            CLOCK["train_cpu_s"] = time.process_time() - c0

    trl.SFTTrainer.train = timed_train


def worker_btkit(a: argparse.Namespace) -> dict:
    heavy_imports()
    from plugins.train.data import read_rows
    from plugins.train.sft import TrainSettings, train_model

    rows = read_rows(Path(a.rows))
    settings = TrainSettings(max_steps=a.max_steps, batch_size=a.batch_size, max_length=a.max_length,
                             learning_rate=a.learning_rate, lora_r=a.lora_r, seed=0, device="cpu",
                             gradient_checkpointing=a.gradient_checkpointing)
    t0 = time.monotonic()
    summary = train_model(rows, Path(a.run_dir), base=a.base_dir, settings=settings, quiet=False)
    total = time.monotonic() - t0
    return {"tokens": summary["tokens"], "train_s": round(CLOCK["train_s"], 2), "train_cpu_s": round(CLOCK["train_cpu_s"], 2),
            "btkit_wall_s": summary["wall_s"], "total_s": round(total, 2), "steps": summary["steps"],
            "train_loss": summary["train_loss"]}


def worker_bare(a: argparse.Namespace) -> dict:
    heavy_imports()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in open(a.rows_json, encoding="utf-8")]
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(a.base_dir)
    model = AutoModelForCausalLM.from_pretrained(a.base_dir, dtype=torch.float32)
    peft_config = None
    if a.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=a.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(output_dir=a.run_dir, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
                       max_length=a.max_length, learning_rate=a.learning_rate, seed=0, logging_steps=1,
                       report_to=[], use_cpu=True, disable_tqdm=True,
                       # TRL's own default is True; set as btkit's run has it, so both do the same work
                       gradient_checkpointing=a.gradient_checkpointing)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config)
    setup = time.monotonic() - t0
    result = trainer.train()
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
    return {"tokens": int(tokens[-1]) if tokens else None, "train_s": round(CLOCK["train_s"], 2),
            "train_cpu_s": round(CLOCK["train_cpu_s"], 2), "setup_s": round(setup, 2),
            "steps": trainer.state.global_step, "train_loss": result.training_loss}


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=("btkit", "bare"), help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows-json", help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=str(ROOT / "examples/seed.jsonl"), help="pairs to train on (JSONL or run directory)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--lora-r", type=int, default=16, help="0: full finetuning")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="both runs with gradient checkpointing (btkit's default is off, TRL's SFTConfig's on)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_train"))
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the runs (0: unset)")
    a = ap.parse_args()

    if a.worker:
        result = (worker_btkit if a.worker == "btkit" else worker_bare)(a)
        print("RESULT " + json.dumps(result))
        return

    from plugins.train.base_model import hf_model_dir
    from plugins.train.data import read_rows

    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base_dir = str(hf_model_dir(None))
    rows_json = out / "rows.jsonl"
    with open(rows_json, "w", encoding="utf-8") as f:  # exactly the rows btkit trains on
        for r in read_rows(Path(a.rows)):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    common = [*(["--gradient-checkpointing"] if a.gradient_checkpointing else []), "--max-steps", str(a.max_steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
              "--learning-rate", str(a.learning_rate), "--lora-r", str(a.lora_r), "--rows", a.rows,
              "--rows-json", str(rows_json), "--base-dir", base_dir]
    runs: dict[str, list[dict]] = {"btkit": [], "bare": []}
    loads = [load()]
    for i in range(a.repeats):
        for kind in ("btkit", "bare"):
            run_dir = out / f"{kind}-{i}"
            cmd = [sys.executable, __file__, "--worker", kind, "--run-dir", str(run_dir), *common]
            with open(out / f"{kind}-{i}.log", "w") as log:
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                sys.exit(f"{kind} run {i} failed ({p.returncode}); see {out / f'{kind}-{i}.log'}")
            r = json.loads(line[0][7:])
            r["tokens_per_s"] = round(r["tokens"] / r["train_s"], 1)
            r["tokens_per_cpu_s"] = round(r["tokens"] / r["train_cpu_s"], 1)
            r["load"] = load()
            runs[kind].append(r)
            print(f"{kind} {i}: {r}", file=sys.stderr, flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    loads.append(load())
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(r["tokens_per_cpu_s"] for r in v) for k, v in runs.items()}
    over = [r["total_s"] - r["train_s"] for r in runs["btkit"]]
    setup = [r["setup_s"] for r in runs["bare"]]
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "settings": {k: v for k, v in vars(a).items() if k not in ("worker", "run_dir", "rows_json", "base_dir", "out")}
                    | {"base_dir": base_dir, "rows_count": sum(1 for _ in open(rows_json))},
        "load_avg": loads, "runs": runs,
        "median_tokens_per_s": med, "ratio_btkit_vs_bare": round(med["btkit"] / med["bare"], 4),
        "median_tokens_per_cpu_s": med_cpu, "ratio_cpu_btkit_vs_bare": round(med_cpu["btkit"] / med_cpu["bare"], 4),
        "btkit_outside_train_s_median": round(statistics.median(over), 2),
        "bare_setup_s_median": round(statistics.median(setup), 2),
    }
    (out / "bench_train.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{a.max_steps} steps, batch {a.batch_size}, max_length {a.max_length}, "
          f"{'LoRA r=' + str(a.lora_r) if a.lora_r else 'full finetuning'}, gradient checkpointing "
          f"{'on' if a.gradient_checkpointing else 'off'} in both, {result['settings']['rows_count']} rows, CPU, "
          f"{a.repeats} runs each, interleaved\n")
    print("| trainer | tokens/s per run | median tokens/s | tokens per CPU-s per run | median tokens/CPU-s | train() wall s | tokens | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for k in ("btkit", "bare"):
        v = runs[k]
        losses = ", ".join(f"{r['train_loss']:.4f}" for r in v)
        print(f"| {'btkit train_model' if k == 'btkit' else 'bare TRL SFTTrainer'} | {', '.join(str(r['tokens_per_s']) for r in v)} | "
              f"{med[k]:.1f} | {', '.join(str(r['tokens_per_cpu_s']) for r in v)} | {med_cpu[k]:.1f} | "
              f"{', '.join(str(r['train_s']) for r in v)} | {', '.join(str(r['tokens']) for r in v)} | "
              f"{losses} |")
    print(f"\nbtkit / bare (medians): tokens/s {result['ratio_btkit_vs_bare']:.3f}, tokens per CPU-s {result['ratio_cpu_btkit_vs_bare']:.3f}")
    print(f"btkit outside train() (load, folder, merge, save, digests): {', '.join(f'{x:.1f}' for x in over)} s "
          f"(median {result['btkit_outside_train_s_median']:.1f}); bare script load + set-up: "
          f"{', '.join(f'{x:.1f}' for x in setup)} s (median {result['bare_setup_s_median']:.1f})")
    print(f"load average (1/5/15 min) before/after: {loads[0]} / {loads[1]}; JSON: {out / 'bench_train.json'}")


if __name__ == "__main__":
    main()

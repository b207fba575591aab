"""Humpback's self-training loop (Li et al. 2023, arXiv 2308.06259, sections 2.1-2.3).

Steps, each a folder of the loop directory, done once (see :mod:`.steps`):

1. ``backward``: M_yx, the base model finetuned on the seed pairs reversed (response -> instruction).
   Its training prompt is the ``humpback/augment`` template rendered with no few-shot examples, the
   prompt the augment stage then sends it, so the model is asked exactly as it was trained.
2. ``m0``: M0, the base model finetuned on the seed pairs, tagged "Answer in the style of an AI
   Assistant." (the paper's seed tag).
3. For k = 1..K: ``curate-m{k-1}``: a Humpback run over the corpus whose augment stage is M_yx
   (zero-shot) and whose curate stage is M_{k-1}, in the judge mode chosen (the likelihood modes
   work on a trained ``transformers:`` model too); kept pairs carry the "Answer with knowledge from
   web search." tag and the seed pairs are mixed in with theirs (``--mix-seed``). Then ``m{k}``:
   M_k, the base model finetuned on that data (the paper trains each M_k from the base model on
   seed + curated data, not from M_{k-1}).

The augment calls of every iteration are the same calls (same model, prompt and sampling seed), so
iterations after the first take them from btkit's call cache and only curation is paid again.
``LOOP/report.json`` holds per iteration the kept and dropped counts, the score histogram and the
training loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from btkit.kit.seeds import DEFAULT_SEED, load_seed
from btkit.prompts import PromptLibrary

from ..base_model import model_digest
from ..data import chat_row, read_rows
from ..sft import TrainSettings, train_model
from .steps import LoopDirectory, read_jsonl, run_stages, score_histogram

#: The paper's tags (section 2.3, "system prompts"): they tell M_k which source a pair came from.
SEED_SYSTEM = "Answer in the style of an AI Assistant."
AUGMENTED_SYSTEM = "Answer with knowledge from web search."


def backward_rows(registry: Any, seed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """M_yx's rows: the zero-shot augment prompt for each seed response -> the seed instruction."""
    library = PromptLibrary(registry.prompt_roots(), ())
    rows = []
    for pair in seed:
        prompt = library.render("humpback/augment", {"text": pair["response"], "examples": []})
        rows.append({"prompt": prompt.messages, "completion": [{"role": "assistant", "content": pair["instruction"]}]})
    return rows


def trained_summary(training: dict[str, Any], folder: Path) -> dict[str, Any]:
    return {"model": f"transformers:{folder}", "model_sha256": training["model_sha256"], "rows": training["rows"],
            "train_loss": training["train_loss"], "losses": training["losses"], "steps": training["steps"],
            "tokens_per_s": training["tokens_per_s"]}


def run_humpback_loop(registry: Any, corpus: Path, loop_dir: Path, *, seed_file: Path | None = None,
                      iterations: int = 2, base: str | None = None, train: TrainSettings | None = None,
                      judge_mode: str = "auto", threshold: float | None = None, limit: int | None = None,
                      max_tokens: int = 64, sample_seed: int = 0, concurrency: int | None = None,
                      quiet: bool = False, overwrite: bool = False, cache_path: Path | None = None,
                      use_cache: bool = True) -> dict[str, Any]:
    """Run (or resume) the loop in ``loop_dir``; returns the report (also in ``LOOP/report.json``)."""
    train = train or TrainSettings()
    seed_path = Path(seed_file) if seed_file else DEFAULT_SEED
    settings = {"corpus": str(corpus), "seed": str(seed_path), "iterations": iterations, "base": base or "default",
                "train": train.identity(),
                "judge_mode": judge_mode, "threshold": threshold, "limit": limit, "max_tokens": max_tokens,
                "sample_seed": sample_seed}
    loop = LoopDirectory(loop_dir, "humpback", settings, overwrite=overwrite, quiet=quiet)
    seed = load_seed(seed_path)

    def trainer(rows_of: Any) -> Any:
        def run(folder: Path) -> dict[str, Any]:
            return trained_summary(train_model(rows_of(), folder, base=base, settings=train, quiet=quiet), folder)
        return run

    backward = loop.step("backward", trainer(lambda: backward_rows(registry, seed)))
    models = [loop.step("m0", trainer(lambda: [chat_row(p["instruction"], p["response"], SEED_SYSTEM) for p in seed]))]
    iterations_report = []
    for k in range(1, iterations + 1):
        curator = models[k - 1]
        run_name = f"curate-m{k - 1}"

        def curate(folder: Path, curator: dict[str, Any] = curator) -> dict[str, Any]:
            curate_stage: dict[str, Any] = {"use": "humpback.curate", "model": curator["model"], "judge_mode": judge_mode}
            if threshold is not None:
                curate_stage["score_threshold"] = threshold  # any judge mode (the rubric's --threshold is 1..5 only)
            stats = run_stages(registry, [
                {"use": "humpback.augment", "model": backward["model"], "shots": 0, "seed": str(seed_path),
                 "max_tokens": max_tokens, "sample_seed": sample_seed, "mix_seed": True},
                curate_stage,
            ], input=corpus, out_dir=folder, limit=limit, concurrency=concurrency, quiet=quiet,
                cache_path=cache_path, use_cache=use_cache)
            return {"curator": curator["model"], "curator_sha256": curator["model_sha256"],
                    "augmenter": backward["model"], "augmenter_sha256": backward["model_sha256"],
                    "kept": stats["kept"], "dropped": stats["dropped"], "units": stats["units"],
                    "drops": stats.get("dropped_by_reason", {}), "scores": score_histogram(folder / "candidates.jsonl")}

        curated = loop.step(run_name, curate)
        data = loop.path(run_name) / "data.jsonl"
        model = loop.step(f"m{k}", trainer(lambda data=data: read_rows(data)))
        models.append(model)
        pairs = read_jsonl(data)
        iterations_report.append({
            "iteration": k, "curated_by": curated["curator"], "curated_by_sha256": curated["curator_sha256"],
            "kept": curated["kept"], "dropped": curated["dropped"], "drops": curated["drops"], "scores": curated["scores"],
            "trained_on": len(pairs), "seed_pairs": sum(1 for p in pairs if p.get("system") == SEED_SYSTEM),
            "model": model["model"], "model_sha256": model["model_sha256"], "train_loss": model["train_loss"]})
        loop.write_report({"backward": backward, "m0": models[0], "iterations": iterations_report})
    report = {"backward": backward, "m0": models[0], "iterations": iterations_report,
              "final_model": models[-1]["model"], "final_model_sha256": models[-1]["model_sha256"]}
    loop.write_report(report)
    return report


def check_model_digest(folder: Path, expected: str) -> bool:
    """Whether a model folder still holds the weights a step recorded (for lineage checks)."""
    return model_digest(folder) == expected

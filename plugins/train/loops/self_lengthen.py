"""Self-Lengthen's macro-iterations (Quan et al. 2024, arXiv 2410.23933; code QwenLM/Self-Lengthen, ``run.sh``).

Round r = 1..N, each step a folder of the loop directory, done once (see :mod:`.steps`):

1. ``round{r}-run``: a btkit run of the ``self_lengthen`` method over the instructions, its
   ``generate`` stage on the Generator G_{r-1} and its ``extend`` stage on the Extender E_{r-1}
   (round 1: both the base model: ``--model``, by default the ``--base`` model as a backend,
   ``llamacpp:default`` for the embedded GGUF). With ``--self-instruct N`` the instructions are
   seeds and each round writes new ones on the base model (the paper's step 0 runs on the base model
   every round), with a sampling seed of its own per round.
2. ``round{r}-generator``: G_r trained on (the ``self_lengthen/generate`` prompt of the instruction
   -> the extended response) for every accepted extension of the round (the paper's ``gen_sft``).
3. ``round{r}-extender``: E_r trained on (the ``self_lengthen/extend`` prompt showing the initial
   response with each line dropped with probability ``--drop-lines`` -> the extended response)
   (the paper's ``ext_sft``).

Both prompts are rendered by :class:`btkit.prompts.PromptLibrary` from the method's own templates,
with the variables the stages render them with, so each model is trained on the very prompt it is
asked with in the next round (system prompt included).

Training continues from the previous round's models, as the paper does (its ``mk_train_config.py``
sets ``adapter_name_or_path`` to iteration r-1's LoRA adapter for G and for E): G_r starts from
G_{r-1} and E_r from E_{r-1} (round 1: both from ``--base``), each on this round's data only. With
``--lora-r`` the adapter is merged after each round, so round r adds a fresh LoRA on top of the
merged weights rather than continuing the same adapter (close, not identical). A round that accepts
no extension trains nothing: its models are the previous round's (``trained: false`` in its steps).

Left out (as in the one-pass method): the word-count phrases the paper adds to the queries after
the last round (``eval/add_length_control.py``) and the final data collection with the last models.

``LOOP/report.json`` holds per round: which models generated and extended (spec and sha256), the
mean words and LonGen length score of the initial responses (``initial_*``: all the Generator wrote;
``kept_initial_*``: those whose extension was accepted) and of the accepted extensions
(``extended_*``), the extensions accepted and not, the run's kept/dropped record counts (an accepted
extension keeps two records, one per role) and drop reasons, and each trained model's path, sha256,
rows and training loss.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..sft import TrainSettings

LOOP = "self_lengthen"
#: Templates the method's stages render: the loop renders the same ones for the training prompts.
GENERATE_TEMPLATE = "self_lengthen/generate"
EXTEND_TEMPLATE = "self_lengthen/extend"


def base_backend(base: str | Path | None) -> str:
    """The backend spec that serves ``base`` (a ``--base`` value): round 1's Generator and Extender."""
    if base is None or str(base) in ("", "default", "llamacpp:default"):
        return "llamacpp:default"
    text = str(base)
    if text.startswith(("llamacpp:", "transformers:")):
        return text
    if text.endswith(".gguf"):
        return f"llamacpp:{text}"
    return f"transformers:{text}"


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def round_figures(candidates: Path) -> dict[str, Any]:
    """From a run's journal: every unit the Generator answered (extended or not), its initial words and
    length score; the extended words and score of the accepted ones (the method's ``length_report``)."""
    from btkit_plugins.methods.self_lengthen import length_report

    from .steps import read_jsonl

    lines = read_jsonl(candidates)
    initial_words, initial_scores = [], []
    for line in lines:
        meta = line.get("meta") or {}
        if "initial_words" in meta and meta.get("role") != "extender":
            initial_words.append(meta["initial_words"])
            if "length_score_initial" in meta:
                initial_scores.append(meta["length_score_initial"])
    lengths = length_report(lines)
    return {
        "generated": len(initial_words),
        "initial_words": _mean(initial_words),
        "initial_length_score": _mean(initial_scores),
        "accepted": lengths["accepted"],
        "not_accepted": lengths["not_accepted"],
        "kept_initial_words": lengths["kept_mean_initial_words"],
        "extended_words": lengths["kept_mean_extended_words"],
        "growth": lengths["kept_mean_growth"],
        "kept_initial_length_score": lengths["mean_length_score_initial"],
        "extended_length_score": lengths["mean_length_score_extended"],
        "length_targets": lengths["length_targets"],
    }


def training_rows(registry: Any, pairs: list[dict[str, Any]], drop_share: float, salt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The Generator's and the Extender's rows from a run's accepted extensions (its ``generator`` records).

    Generator: the generate prompt of the instruction -> the extended response. Extender: the extend
    prompt with the initial response, each line dropped with probability ``drop_share`` (seeded by
    ``salt`` and the record id) -> the extended response."""
    from btkit.prompts import PromptLibrary
    from btkit_plugins.methods.self_lengthen import drop_lines

    library = PromptLibrary(registry.prompt_roots(), ())
    gen_rows, ext_rows = [], []
    for pair in pairs:
        meta = pair.get("meta") or {}
        if meta.get("role") != "generator":
            continue
        instruction = meta.get("base_instruction") or pair["instruction"]
        extended = pair["response"]
        completion = [{"role": "assistant", "content": extended}]
        gen = library.render(GENERATE_TEMPLATE, {"instruction": instruction})
        gen_rows.append({"prompt": gen.messages, "completion": completion})
        shown, _ = drop_lines(meta["initial_response"], drop_share, random.Random(f"{salt}|{meta.get('id', pair['instruction'])}"))
        ext = library.render(EXTEND_TEMPLATE, {"instruction": instruction, "response": shown})
        ext_rows.append({"prompt": ext.messages, "completion": completion})
    return gen_rows, ext_rows


def run_self_lengthen_loop(registry: Any, instructions: Path, loop_dir: Path, *, rounds: int = 2, base: str | None = None,
                           train: TrainSettings | None = None, model: str | None = None, self_instruct: int = 0,
                           samples: int = 1, generate_retries: int = 3, max_tokens: int = 640, extend_rounds: int = 3,
                           extend_attempts: int = 2, extend_max_tokens: int = 1024, min_growth: float = 1.2,
                           length_target: str = "150-600", drop_share: float = 0.2, stop: list[str] | None = None,
                           sample_seed: int = 0, limit: int | None = None, concurrency: int | None = None,
                           quiet: bool = False, overwrite: bool = False, cache_path: Path | None = None,
                           use_cache: bool = True) -> dict[str, Any]:
    """Run (or resume) the loop in ``loop_dir``; returns the report (also in ``LOOP/report.json``)."""

    from btkit.config import OptionChecker

    from ..sft import TrainSettings, train_model
    from .humpback import trained_summary
    from .steps import LoopDirectory, read_jsonl, run_stages

    train = train or TrainSettings()
    first = model or base_backend(base)
    settings = {"instructions": str(instructions), "rounds": rounds, "base": str(base) if base else "default", "model": first,
                "train": train.identity(), "self_instruct": self_instruct, "samples": samples, "generate_retries": generate_retries,
                "max_tokens": max_tokens, "extend_rounds": extend_rounds, "extend_attempts": extend_attempts,
                "extend_max_tokens": extend_max_tokens, "min_growth": min_growth, "length_target": length_target,
                "drop_lines": drop_share, "stop": list(stop) if stop else None, "sample_seed": sample_seed, "limit": limit}
    sampling = {"stop": list(stop)} if stop else {}

    def stages(r: int, generator: str, extender: str) -> list[dict[str, Any]]:
        return [
            {"use": "self_lengthen.self_instruct", "self_instruct": self_instruct,
             "sample_seed": sample_seed + 1_000_003 * (r - 1)},  # new instructions every round, on the base model
            {"use": "self_lengthen.generate", "model": generator, "samples": samples, "generate_retries": generate_retries,
             "max_tokens": max_tokens, "sample_seed": sample_seed, **sampling},
            {"use": "self_lengthen.extend", "model": extender, "rounds": extend_rounds, "extend_attempts": extend_attempts,
             "min_growth": min_growth, "length_target": length_target, "drop_lines": drop_share, "max_tokens": extend_max_tokens,
             "sample_seed": sample_seed, **sampling},
        ]

    check = OptionChecker(Path(f"loop {LOOP}"), registry)  # a bad option stops here, before the loop folder is made
    for i, raw in enumerate(stages(1, first, first)):
        check.stage(dict(raw), i)
    loop = LoopDirectory(loop_dir, LOOP, settings, overwrite=overwrite, quiet=quiet)
    start = {"model": first, "model_sha256": None, "trained": False}
    generator, extender = start, start
    train_from: dict[str, str | None] = {"generator": str(base) if base else None, "extender": str(base) if base else None}
    rounds_report: list[dict[str, Any]] = []
    report: dict[str, Any] = {"base": settings["base"], "round1_model": first, "rounds": rounds_report}
    for r in range(1, rounds + 1):
        run_name = f"round{r}-run"

        def run(folder: Path, r: int = r, generator: dict[str, Any] = generator, extender: dict[str, Any] = extender) -> dict[str, Any]:
            stats = run_stages(registry, stages(r, generator["model"], extender["model"]), input=instructions, out_dir=folder,
                               model=first, limit=limit, concurrency=concurrency, quiet=quiet, cache_path=cache_path,
                               use_cache=use_cache)
            return {"generator": generator["model"], "generator_sha256": generator["model_sha256"],
                    "extender": extender["model"], "extender_sha256": extender["model_sha256"],
                    "units": stats["units"], "kept": stats["kept"], "dropped": stats["dropped"],
                    "drops": stats.get("dropped_by_reason", {}), **round_figures(folder / "candidates.jsonl")}

        ran = loop.step(run_name, run)
        pairs = read_jsonl(loop.path(run_name) / "data.jsonl")
        gen_rows, ext_rows = training_rows(registry, pairs, drop_share, f"{LOOP}|round{r}")

        def trainer(rows: list[dict[str, Any]], previous: dict[str, Any], role: str) -> Any:
            def step(folder: Path) -> dict[str, Any]:
                if not rows:  # nothing accepted this round: the previous model stays
                    loop.say(f"round {r}: no accepted extension, the {role} is not retrained")
                    return {**{k: previous.get(k) for k in ("model", "model_sha256")}, "trained": False, "rows": 0,
                            "train_loss": None, "reason": "no_accepted_extension"}
                training = train_model(rows, folder, base=train_from[role], settings=train, quiet=quiet)
                return {**trained_summary(training, folder), "trained": True, "trained_from": train_from[role] or "default",
                        "trained_from_sha256": training.get("base_sha256")}
            return step

        generator = loop.step(f"round{r}-generator", trainer(gen_rows, generator, "generator"))
        extender = loop.step(f"round{r}-extender", trainer(ext_rows, extender, "extender"))
        for role, m in (("generator", generator), ("extender", extender)):
            if m.get("trained"):
                train_from[role] = m["model"]
        rounds_report.append({
            "round": r,
            "generated_by": ran["generator"], "generated_by_sha256": ran["generator_sha256"],
            "extended_by": ran["extender"], "extended_by_sha256": ran["extender_sha256"],
            "instructions": ran["units"], "kept": ran["kept"], "dropped": ran["dropped"], "drops": ran["drops"],
            **{k: ran[k] for k in ("generated", "initial_words", "initial_length_score", "accepted", "not_accepted",
                                   "kept_initial_words", "extended_words", "growth", "kept_initial_length_score",
                                   "extended_length_score", "length_targets")},
            "generator": _model_entry(generator), "extender": _model_entry(extender)})
        loop.write_report(report)
    report.update(final_generator=generator["model"], final_generator_sha256=generator["model_sha256"],
                  final_extender=extender["model"], final_extender_sha256=extender["model_sha256"])
    loop.write_report(report)
    return report


def _model_entry(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "model_sha256", "trained", "trained_from", "rows", "steps", "train_loss", "reason")
    return {k: step[k] for k in keys if k in step}


@click.command("self_lengthen")
@click.argument("instructions", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--rounds", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Macro-iterations: each runs Self-Lengthen with the previous round's Generator and Extender, then retrains both (the paper: 3).")
@click.option("--model", "model", default=None,
              help="Round 1's Generator and Extender (default: the --base model as a backend: llamacpp:default for the embedded model or a "
                   "GGUF, transformers:DIR for an HF folder). Later rounds use the models the loop trained (transformers:LOOP/roundN-...).")
@click.option("--self-instruct", type=click.IntRange(0, 1000), default=0, show_default=True,
              help="Treat the instructions as seeds and write this many new ones from each, every round, on the base model (0: use them as given).")
@click.option("--samples", type=click.IntRange(1, 16), default=1, show_default=True, help="Initial responses per instruction (the paper: 2).")
@click.option("--generate-retries", type=click.IntRange(0, 100), default=3, show_default=True, help="Re-sample an initial response that fails the checks this many times.")
@click.option("--max-tokens", type=click.IntRange(1), default=640, show_default=True, help="Length cap of an initial response (a reply cut here is re-sampled).")
@click.option("--extend-rounds", type=click.IntRange(1, 10), default=3, show_default=True, help="Extension rounds per attempt (the method's --rounds).")
@click.option("--extend-attempts", type=click.IntRange(1, 20), default=2, show_default=True, help="Whole extensions tried per response until one is accepted.")
@click.option("--extend-max-tokens", type=click.IntRange(1), default=1024, show_default=True, help="Length cap of an extension call.")
@click.option("--min-growth", type=click.FloatRange(1.0, 100.0), default=1.2, show_default=True, help="Accept an extension with more than this many times the initial words.")
@click.option("--length-target", default="150-600", show_default=True, help="Word-count target of the LonGen length score ('about N', 'above N', 'below N', 'A-B'; a row's length_target wins).")
@click.option("--drop-lines", "drop_share", type=click.FloatRange(0.0, 1.0), default=0.2, show_default=True, help="Share of the initial response's lines dropped in the Extender's training prompt.")
@click.option("--stop", multiple=True, help="Stop string of the generate and extend calls (repeatable; default: the method's). A tiny run can stop at the first "
                   "newline (bash: --stop $'\\n') to keep every reply to one paragraph.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Sampling seed of the generate and extend calls (the same every round).")
def loop_self_lengthen(instructions: Path, out_dir: Path, **params: Any) -> None:
    """Self-Lengthen: each round, generate with G_{r-1} and extend with E_{r-1}, then train G_r and E_r on the accepted extensions."""
    from ..commands import _finish, _registry, train_settings

    base = params.pop("base")
    settings = train_settings(params)
    report = run_self_lengthen_loop(
        _registry(), instructions, out_dir, rounds=params["rounds"], base=base, train=settings, model=params["model"],
        self_instruct=params["self_instruct"], samples=params["samples"], generate_retries=params["generate_retries"],
        max_tokens=params["max_tokens"], extend_rounds=params["extend_rounds"], extend_attempts=params["extend_attempts"],
        extend_max_tokens=params["extend_max_tokens"], min_growth=params["min_growth"], length_target=params["length_target"],
        drop_share=params["drop_share"], stop=list(params["stop"]) or None, sample_seed=params["sample_seed"],
        limit=params["limit"], concurrency=params["concurrency"], quiet=params["quiet"], overwrite=params["overwrite"],
        cache_path=params["cache_path"], use_cache=not params["no_cache"])
    _finish(report, out_dir)

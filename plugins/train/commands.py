"""``btkit train``, ``btkit loop LOOP`` and ``btkit export-gguf``: the finetune plugin's commands.

Training settings come from options (``--epochs``, ``--max-steps``, ``--learning-rate``, ...), from
a settings file (``--train-config FILE.yaml``: a mapping of the same keys, or one under ``train:``),
or both (options win). Every loop takes the same settings for every model it trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from btkit.errors import BtkitError

TRAIN_OPTIONS = [
    click.Option(["--base"], default=None, help="Model to start from: a .gguf file, llamacpp:PATH, an HF model folder or transformers:DIR. Default: the embedded SmolLM2-135M GGUF (dequantized once into an HF copy)."),
    click.Option(["--train-config", "train_config"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="YAML or JSON file of training settings (keys as the options below, e.g. max_steps: 200)."),
    click.Option(["--epochs"], type=float, default=None, help="Epochs over the rows (default 1)."),
    click.Option(["--max-steps"], type=int, default=None, help="Optimizer steps; > 0 overrides --epochs."),
    click.Option(["--learning-rate", "--lr", "learning_rate"], type=float, default=None, help="Peak learning rate (default 2e-5; LoRA wants about 1e-4 to 1e-3)."),
    click.Option(["--batch-size"], type=int, default=None, help="Rows per device batch (default 4)."),
    click.Option(["--grad-accum"], type=int, default=None, help="Gradient accumulation steps (default 1)."),
    click.Option(["--max-length"], type=int, default=None, help="Tokens per row, prompt and response together; longer rows are cut (default 1024)."),
    click.Option(["--train-seed", "train_seed"], type=int, default=None, help="Seed of initialisation, shuffling and dropout (default 0)."),
    click.Option(["--lora-r"], type=int, default=None, help="LoRA rank on every linear layer, merged into the model at the end; 0 = full finetuning (default)."),
    click.Option(["--lora-alpha"], type=int, default=None, help="LoRA alpha (default 16)."),
    click.Option(["--save-steps"], type=int, default=None, help="Checkpoint every N steps; a killed training resumes from the newest (default 50)."),
    click.Option(["--warmup-steps"], type=int, default=None, help="Linear warm-up steps (default 0)."),
    click.Option(["--device"], type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="auto: cuda when available (default)."),
    click.Option(["--gradient-checkpointing/--no-gradient-checkpointing"], default=None, help="Recompute activations in the backward pass: less memory, about a third more time (default off)."),
]

_SETTING_OF_OPTION = {"train_seed": "seed"}


def train_settings(params: dict[str, Any]) -> Any:
    """TrainSettings from a settings file and the options (popped from ``params``)."""
    from .sft import TrainSettings

    values: dict[str, Any] = {}
    config = params.pop("train_config", None)
    where = "training settings"
    if config is not None:
        where = str(config)
        values.update(read_settings_file(config))
    for opt in TRAIN_OPTIONS:
        name = opt.name
        if name in ("base", "train_config"):
            continue
        value = params.pop(name, None)
        if value is not None:
            values[_SETTING_OF_OPTION.get(name, name)] = value
            where = "training options" if config is None else f"{config} and the options"
    return TrainSettings.from_mapping(values, where)


def read_settings_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise BtkitError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise BtkitError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML/JSON") from None
    if isinstance(data, dict) and isinstance(data.get("train"), dict):
        data = data["train"]
    if not isinstance(data, dict):
        raise BtkitError(f"{path}: expected a mapping of training settings (max_steps: 200, ...)")
    return data


@click.command("train")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model folder to write (re-running the same command resumes or reuses it).")
@click.option("--overwrite", is_flag=True, help="Start over in a folder that holds a training with other rows or settings (moved aside, not deleted).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def train_command(data: Path, out_dir: Path, overwrite: bool, quiet: bool, **params: Any) -> None:
    """Finetune a model on a btkit run directory or a JSONL of pairs (loss on the responses only).

    The result is a Hugging Face model folder: use it as --model transformers:OUT, or export it
    with btkit export-gguf for llamacpp:.
    """
    from .data import read_rows
    from .sft import train_model

    base = params.pop("base")
    settings = train_settings(params)
    summary = train_model(read_rows(data), out_dir, base=base, settings=settings, quiet=quiet, overwrite=overwrite)
    click.echo(f"trained {summary['steps']} steps on {summary['rows']} rows (loss {summary['train_loss']:.4f}) -> {out_dir} "
               f"(use --model transformers:{out_dir})", err=True)


for _opt in reversed(TRAIN_OPTIONS):
    train_command.params.insert(1, _opt)


LOOP_COMMON = [
    click.Option(["-o", "--out", "out_dir"], required=True, type=click.Path(file_okay=False, path_type=Path), help="Loop directory (one folder per step; re-running the same command resumes it)."),
    click.Option(["--limit"], type=click.IntRange(1), default=None, help="Read at most N corpus records."),
    click.Option(["--concurrency"], type=click.IntRange(1), default=None, help="Model calls in flight per run step."),
    click.Option(["--no-cache"], is_flag=True, help="Do not read or write the model-call cache."),
    click.Option(["--cache", "cache_path"], type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file."),
    click.Option(["--overwrite"], is_flag=True, help="Start over in a loop directory that holds a loop with other settings (moved aside)."),
    click.Option(["-q", "--quiet"], is_flag=True, help="No progress lines."),
]


#: Loop name -> (module under this package, command name): imported when that loop is asked for, so
#: ``btkit --help`` does not import every loop (and the methods' kit modules they import).
LOOPS = {"humpback": ("commands", "loop_humpback"), "self_lengthen": ("loops.self_lengthen", "loop_self_lengthen"),
         "cycle_instruct": ("loops.cycle_instruct", "loop_cycle_instruct")}


class LoopGroup(click.Group):
    """``btkit loop NAME``: one subcommand per loop, imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(LOOPS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in LOOPS:
            return None
        import importlib

        module, attr = LOOPS[name]
        command = getattr(importlib.import_module(f"{__package__}.{module}"), attr)
        _add_common(command)
        return command


@click.group("loop", cls=LoopGroup)
def loop_group() -> None:
    """Self-training loops that train models on their own data (humpback, self_lengthen, cycle_instruct)."""


def _registry() -> Any:
    from btkit.plugins import get_registry

    return get_registry()


def _finish(report: dict[str, Any], out_dir: Path) -> None:
    click.echo(json.dumps(report.get("iterations", report.get("rounds", [])), indent=1), err=False)
    click.echo(f"loop complete -> {out_dir}/report.json", err=True)


@click.command("humpback")
@click.argument("corpus", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--seed", "seed_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None, help="Seed pairs (JSONL of instruction/response); default: btkit's three hand-written pairs.")
@click.option("--iterations", type=click.IntRange(1, 10), default=2, show_default=True, help="Curate-and-train iterations after M0 (2: M1 and M2, as in the paper).")
@click.option("--judge-mode", default="auto", show_default=True, help="How M_k curates: auto, rubric, logprob, pmi, ifd, complete.")
@click.option("--threshold", type=float, default=None, help="Keep pairs scoring at least this (default: the judge mode's).")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True, help="Length cap of a generated instruction.")
@click.option("--sample-seed", type=int, default=0, show_default=True, help="Sampling seed of the augment calls (the same every iteration, so they are cached).")
def loop_humpback(corpus: Path, out_dir: Path, **params: Any) -> None:
    """Humpback: M_yx on reversed seed -> augment -> M0 on seed -> curate with M0 -> M1 -> curate with M1 -> M2."""
    from .loops.humpback import run_humpback_loop

    base = params.pop("base")
    settings = train_settings(params)
    report = run_humpback_loop(_registry(), corpus, out_dir, seed_file=params["seed_file"], iterations=params["iterations"],
                               base=base, train=settings, judge_mode=params["judge_mode"], threshold=params["threshold"],
                               limit=params["limit"], max_tokens=params["max_tokens"], sample_seed=params["sample_seed"],
                               concurrency=params["concurrency"], quiet=params["quiet"], overwrite=params["overwrite"],
                               cache_path=params["cache_path"], use_cache=not params["no_cache"])
    _finish(report, out_dir)


def _add_common(command: click.Command) -> None:
    """Every loop takes the loop directory, run and training options after its first argument (once)."""
    if not getattr(command, "_btkit_common", False):
        command.params[1:1] = list(LOOP_COMMON) + list(TRAIN_OPTIONS)
        command._btkit_common = True  # type: ignore[attr-defined]



def register(cli: Any) -> None:
    """Add the finetune plugin's commands: train, loop (its loops load on demand) and export-gguf."""
    from .gguf_export import export_gguf_command

    cli.add_command(train_command)
    cli.add_command(loop_group)
    cli.add_command(export_gguf_command)

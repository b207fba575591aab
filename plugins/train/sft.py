"""Supervised finetuning on btkit pairs with TRL's SFTTrainer (Hugging Face Trainer underneath).

Layout of a model folder ``OUT`` that :func:`train_model` writes:

- ``OUT/rows.jsonl`` and ``OUT/train-settings.json``: the exact rows and settings, written first; a
  re-run with other rows or settings is refused (``--overwrite`` moves the old folder aside).
- ``OUT/checkpoints/checkpoint-N/``: Trainer checkpoints (model, optimizer, scheduler, RNG, data
  position) every ``save_steps``; a killed training resumes from the newest one.
- the final model (``config.json``, ``model.safetensors``, tokenizer files): a plain HF model, LoRA
  adapters merged in, loadable by ``transformers:OUT`` and exportable to GGUF.
- ``OUT/training.json``, written last: the settings, the base model and its digest, the rows'
  digest, the loss per logged step, tokens/s and the model's own digest. Its presence means the
  folder is complete, so a loop skips the step; the checkpoints are removed after it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from btkit.errors import BtkitError

from .base_model import hf_model_dir, model_digest
from .data import rows_digest

TRAINING_FILE = "training.json"
SETTINGS_FILE = "train-settings.json"
ROWS_FILE = "rows.jsonl"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainSettings:
    """What a training run is: the same settings and rows give the same model (on the same hardware)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-5
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    seed: int = 0
    lora_r: int = 0  # 0: full finetuning; > 0: LoRA of that rank on every linear layer, merged at the end
    lora_alpha: int = 16
    save_steps: int = 50
    warmup_steps: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    # Recompute activations in the backward pass: less memory for big models, about a third more time.
    # TRL turns it on by default; off here, since the models a laptop trains fit without it.
    gradient_checkpointing: bool = False

    #: Fields that change how fast or where a training runs, not what it learns: left out of
    #: :meth:`identity`, so changing them (or a new one of them) never refuses a folder.
    RUNTIME_ONLY = ("device", "gradient_checkpointing", "save_steps")

    def identity(self) -> dict[str, Any]:
        """What decides the trained weights: the settings a model or loop folder is checked against."""
        return {k: v for k, v in asdict(self).items() if k not in self.RUNTIME_ONLY}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "settings") -> "TrainSettings":
        """Settings from a dict (CLI or a pipeline file's ``train:`` section); unknown keys or bad values: one line."""
        known = {f.name: f for f in fields(cls)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            k = key.replace("-", "_")
            if k not in known:
                raise BtkitError(f"{where}: unknown training setting '{key}'; known: {', '.join(sorted(known))}")
            typ = type(getattr(cls(), k))
            try:
                if typ is bool:
                    if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    v = str(value).lower() in ("true", "1", "yes")
                else:
                    v = typ(value) if typ is not float else float(value)
            except (TypeError, ValueError):
                raise BtkitError(f"{where}: training setting '{key}' must be {typ.__name__}, got {value!r}") from None
            out[k] = v
        s = cls(**out)
        s.check(where)
        return s

    def check(self, where: str = "settings") -> None:
        problems = []
        if self.max_steps <= 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append("epochs must be > 0 (or max_steps > 0)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append("learning_rate must be > 0")
        for name in ("batch_size", "grad_accum", "max_length", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.lora_r < 0:
            problems.append("lora_r must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append("device must be auto, cpu or cuda")
        if problems:
            raise BtkitError(f"{where}: " + "; ".join(problems))


def is_trained(out_dir: Path) -> bool:
    return (Path(out_dir) / TRAINING_FILE).is_file()


def read_training(out_dir: Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / TRAINING_FILE).read_text())


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint (one with its trainer state written)."""
    ckpts = []
    for p in (Path(out_dir) / CHECKPOINTS).glob("checkpoint-*"):
        if (p / "trainer_state.json").is_file() and p.name.split("-")[-1].isdigit():
            ckpts.append((int(p.name.split("-")[-1]), p))
    return max(ckpts)[1] if ckpts else None


def _prepare_dir(out_dir: Path, rows: list[dict[str, Any]], base: str, settings: TrainSettings, overwrite: bool) -> dict[str, Any]:
    """Write (or check) the rows and settings a training in ``out_dir`` is for."""
    wanted = {"base": base, "settings": settings.identity(), "rows_sha256": rows_digest(rows), "rows": len(rows)}
    settings_path = out_dir / SETTINGS_FILE
    if settings_path.is_file():
        have = json.loads(settings_path.read_text())
        # a folder written before a setting existed had its default
        have["settings"] = {**TrainSettings().identity(), **{k: v for k, v in have.get("settings", {}).items() if k not in TrainSettings.RUNTIME_ONLY}}
        if have != wanted:
            if not overwrite:
                changed = sorted(k for k in wanted if have.get(k) != wanted[k])
                raise BtkitError(f"{out_dir}: holds a training with other {', '.join(changed)}; use another folder or --overwrite (the old one is moved aside)")
            aside = out_dir.with_name(f"{out_dir.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(out_dir, aside)
            print(f"moved the previous training aside to {aside}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not settings_path.is_file():
        tmp = out_dir / f".{ROWS_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out_dir / ROWS_FILE)
        settings_path.write_text(json.dumps(wanted, indent=2) + "\n")
    return wanted


def train_model(rows: list[dict[str, Any]], out_dir: Path, base: str | Path | None = None,
                settings: TrainSettings | None = None, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Finetune ``base`` (HF folder, GGUF, or None for the embedded model) on ``rows`` into ``out_dir``.

    Returns the contents of ``training.json``. A complete folder for the same rows and settings is
    returned as it is (no training); a killed one resumes from its newest checkpoint.
    """
    settings = settings or TrainSettings()
    out_dir = Path(out_dir)
    if not rows:
        raise BtkitError(f"{out_dir}: no rows to train on")
    base_label = str(base) if base is not None else "default"
    wanted = _prepare_dir(out_dir, rows, base_label, settings, overwrite)
    if is_trained(out_dir):
        return read_training(out_dir)
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        raise BtkitError(f"finetuning needs the train extra: pip install 'btkit[train]' ({e})") from None

    if quiet or not sys.stderr.isatty():  # datasets' and transformers' own bars: one per map and save
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    base_dir = hf_model_dir(base)
    device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_config = None
    if settings.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    config = SFTConfig(
        output_dir=str(out_dir / CHECKPOINTS),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        seed=settings.seed,
        data_seed=settings.seed,
        warmup_steps=settings.warmup_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=1,
        report_to=[],
        use_cpu=device == "cpu",
        disable_tqdm=True,
        completion_only_loss=True,
        dataloader_num_workers=0,
        gradient_checkpointing=settings.gradient_checkpointing,
    )
    progress = ProgressCallback(quiet=quiet)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[progress.as_trainer_callback(TrainerCallback)])
    trainer.remove_callback(PrinterCallback)  # our own progress line says the same, once
    usable = len(trainer.train_dataset)
    if usable == 0:  # TRL drops rows whose completion the length cap cut away entirely
        raise BtkitError(f"{out_dir}: every one of the {len(rows)} rows has its prompt cut by max_length {settings.max_length}, "
                         "so no response token is left to learn; raise --max-length")
    resume = latest_checkpoint(out_dir)
    if resume is not None and not quiet:
        print(f"resuming training from {resume}", file=sys.stderr)
    started = time.monotonic()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall = time.monotonic() - started
    final = trainer.model
    if settings.lora_r > 0:
        final = final.merge_and_unload()
    final.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    summary = {
        **wanted,
        "base_dir": str(base_dir),
        "base_sha256": model_digest(base_dir),
        "model_sha256": model_digest(out_dir),
        "rows_used": usable,  # rows whose response was cut away entirely by max_length are not trained on
        "steps": trainer.state.global_step,
        "resumed_from": str(resume) if resume else None,
        "train_loss": result.training_loss,
        "losses": progress.losses,
        "tokens": progress.tokens,
        "tokens_per_s": round(progress.tokens / wall, 1) if wall > 0 and progress.tokens else None,
        "wall_s": round(wall, 2),
        "device": device,
    }
    tmp = out_dir / f".{TRAINING_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out_dir / TRAINING_FILE)
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    return summary


class ProgressCallback:
    """A one-line progress bar on stderr with step, loss and tokens/s; the losses for training.json."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.losses: list[dict[str, float]] = []
        self.tokens = 0
        self._bar: Any = None
        self._t0 = time.monotonic()
        self._tokens0: float | None = None

    def as_trainer_callback(self, base: type) -> Any:
        outer = self

        class _Callback(base):  # type: ignore[misc, valid-type]
            def on_train_begin(self, args, state, control, **kw):
                outer._begin(state)

            def on_log(self, args, state, control, logs=None, **kw):
                outer._log(state, logs or {})

            def on_train_end(self, args, state, control, **kw):
                outer._end()

        return _Callback()

    def _begin(self, state: Any) -> None:
        self._t0 = time.monotonic()
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", file=sys.stderr)

    def _log(self, state: Any, logs: dict[str, Any]) -> None:
        if "loss" not in logs:
            return
        entry = {"step": state.global_step, "loss": round(float(logs["loss"]), 5)}
        self.losses.append(entry)
        total = logs.get("num_tokens")
        if total is not None:
            if self._tokens0 is None:  # TRL counts tokens from the start of training, resumed or not
                self._tokens0 = 0.0 if not self.losses[:-1] else float(total)
            self.tokens = int(float(total) - (self._tokens0 or 0.0))
        rate = self.tokens / max(time.monotonic() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.n = state.global_step
            self._bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{rate:.0f}")
        elif not self.quiet:
            print(f"train: step {state.global_step}/{state.max_steps} loss {entry['loss']:.4f} {rate:.0f} tokens/s", file=sys.stderr)

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()

"""What every self-training loop shares: a loop directory of steps, each done once.

A loop directory ``LOOP/`` holds ``loop.json`` (the loop's name and settings: a re-run with other
settings is refused) and one folder per step, e.g. ``LOOP/m1/`` (a trained model) or
``LOOP/curate-m1/`` (a btkit run directory). A step is complete when its folder holds
``step.json`` (written last, atomically, with the step's summary); a complete step is never run
again, so a loop killed anywhere (``kill -9``) and re-run recomputes nothing it had finished. An
incomplete step is resumed by its own machinery: a btkit run resumes from its journal (finished
records and cached calls are not paid again), a training from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from btkit.config import OptionChecker, run_config
from btkit.errors import BtkitError

STEP_FILE = "step.json"
LOOP_FILE = "loop.json"
REPORT_FILE = "report.json"


class LoopDirectory:
    """The folder of one loop: its settings, its steps and its report."""

    def __init__(self, root: Path, loop: str, settings: dict[str, Any], overwrite: bool = False, quiet: bool = False):
        self.root = Path(root)
        self.loop = loop
        self.quiet = quiet
        wanted = {"loop": loop, "settings": settings}
        path = self.root / LOOP_FILE
        if path.is_file():
            have = json.loads(path.read_text())
            if have != wanted:
                if not overwrite:
                    changed = sorted(k for k in set(wanted["settings"]) | set(have.get("settings", {}))
                                     if have.get("settings", {}).get(k) != wanted["settings"].get(k))
                    what = f"'{have.get('loop')}' loop" if have.get("loop") != loop else f"loop with other settings ({', '.join(changed)})"
                    raise BtkitError(f"{self.root}: holds a {what}; use another folder or --overwrite (the old one is moved aside)")
                aside = self.root.with_name(f"{self.root.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.root, aside)
                self.say(f"moved the previous loop aside to {aside}")
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            _write_json(path, wanted)

    def say(self, line: str) -> None:
        if not self.quiet:
            print(f"loop {self.loop}: {line}", file=sys.stderr)

    def path(self, step: str) -> Path:
        return self.root / step

    def done(self, step: str) -> dict[str, Any] | None:
        """The summary of a complete step, or None."""
        p = self.root / step / STEP_FILE
        return json.loads(p.read_text()) if p.is_file() else None

    def step(self, step: str, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        """Run ``run(folder)`` unless the step is complete; record and return its summary."""
        summary = self.done(step)
        if summary is not None:
            self.say(f"{step}: complete, skipped")
            return summary
        folder = self.root / step
        folder.mkdir(parents=True, exist_ok=True)
        self.say(f"{step}: running")
        started = time.monotonic()
        summary = run(folder)
        summary = {"step": step, **summary, "step_wall_s": round(time.monotonic() - started, 2)}
        _write_json(folder / STEP_FILE, summary)
        return summary

    def write_report(self, report: dict[str, Any]) -> Path:
        """``LOOP/report.json``: the loop's per-iteration figures (rewritten after each iteration)."""
        path = self.root / REPORT_FILE
        _write_json(path, {"loop": self.loop, **report})
        return path


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_stages(registry: Any, stages: list[dict[str, Any]], *, input: Path, out_dir: Path, model: str | None = None,
               options: dict[str, Any] | None = None, concurrency: int | None = None, limit: int | None = None,
               quiet: bool = False, cache_path: Path | None = None, use_cache: bool = True,
               prompt_overrides: list[Path] | None = None, backend_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A btkit run of ``stages`` (pipeline-file stage mappings: ``{"use": "humpback.curate", "model": ...}``).

    Built exactly as a pipeline file's stages are (:class:`btkit.config.OptionChecker`), so a loop
    step checks its options the way ``btkit run PIPELINE.yaml`` does, and resumes the same way.
    """
    from btkit.engine import run_pipeline

    check = OptionChecker(Path(out_dir) / "loop-step", registry)
    specs = [check.stage(dict(raw), i) for i, raw in enumerate(stages)]
    config = run_config(specs, input=input, out_dir=out_dir, model=model, options=options, concurrency=concurrency,
                        limit=limit, quiet=quiet, cache_path=cache_path, use_cache=use_cache,
                        prompt_overrides=list(prompt_overrides or []), backend_options=backend_options)
    return run_pipeline(config, registry)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def score_histogram(candidates: Path, label: str | None = None, bins: int = 10) -> dict[str, Any]:
    """Scores in a run's journal (``meta.score`` of records that got one): count, mean, and a histogram."""
    scores = []
    for row in read_jsonl(candidates):
        meta = row.get("meta") or {}
        score = meta.get("score")
        if isinstance(score, (int, float)) and score == score:
            scores.append(float(score))
    if not scores:
        return {"count": 0}
    lo, hi = min(scores), max(scores)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / width), bins - 1)] += 1
    return {"count": len(scores), "mean": round(sum(scores) / len(scores), 4), "min": lo, "max": hi,
            "edges": [round(lo + i * width, 4) for i in range(bins + 1)], "counts": counts}

"""Seed pairs: loading them with clear errors, and choosing few-shot examples that reproduce.

Humpback, Kun and any method that shows a model seed (instruction, response) pairs as few-shot
turns share this. ``DEFAULT_SEED`` holds three hand-written pairs for runs given no ``--seed``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from btkit.io import iter_jsonl
from btkit.options import SHOTS

DEFAULT_SEED = Path(__file__).with_name("default_seed.jsonl")


def seed_options(used_for: str = "as few-shot examples (default: 3 built-in pairs)", shots: int = 3,
                 shots_help: str = "Few-shot examples per augment prompt (0: none).") -> list[click.Option]:
    """``--seed FILE`` (the option ``seed_file``) and ``--shots N``, as every method that shows seed pairs
    declares them."""
    return [
        click.Option(["--seed", "seed_file"], type=click.Path(dir_okay=False), default=None,
                     help=f"JSONL of instruction/response seed pairs, used reversed {used_for}."),
        click.Option(["--shots"], type=SHOTS, default=shots, show_default=True, help=shots_help),
    ]


def load_seed(path: str | Path) -> list[dict[str, str]]:
    """Seed pairs from JSONL (instruction, response); clear errors naming file, line and field."""
    return [{"instruction": o["instruction"], "response": o["response"]} for _, o in iter_jsonl(path, ("instruction", "response"))]


def pick_examples(seed: list[dict[str, str]], key: str, shots: int) -> list[dict[str, str]]:
    """A deterministic, per-record choice of few-shot examples, so prompts vary but reproduce."""
    if not seed or shots <= 0:
        return []
    start = int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % len(seed)
    return [seed[(start + i) % len(seed)] for i in range(min(shots, len(seed)))]


__all__ = ["DEFAULT_SEED", "load_seed", "pick_examples", "seed_options"]

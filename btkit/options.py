"""Option types shared by the command line, pipeline files and ``-S STAGE.KEY=VALUE``.

One definition per option, so a value is checked the same way wherever it is given: click uses
these types for the flags, and :class:`btkit.config.OptionChecker` converts pipeline-file and ``-S``
values with the very same types. Every range is stated here, so a bad value stops the run with
one line naming the option before any model call (a NaN temperature would otherwise be sent as
``NaN``, which is not JSON; a negative ``--candidates`` would drop every record).
"""

from __future__ import annotations

import math
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``inf``, which every range test lets through
    (``nan < 0`` is false) and which no JSON API accepts."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return rv

    def _describe_range(self) -> str:
        """For ``--help`` (click shows a range type's bounds); unbounded means any finite number."""
        if self.min is None and self.max is None:
            return "finite"
        return super()._describe_range()


MAX_TOKENS = click.IntRange(1)

#: Sampling and retry options every stage accepts, whatever its method (``--temperature``,
#: pipeline keys, ``-S curate.temperature=0``).
GENERAL_OPTIONS: dict[str, click.ParamType] = {
    "temperature": FiniteFloatRange(0),
    "top_p": FiniteFloatRange(0, 1, min_open=True),  # 0 keeps no token at all
    "max_tokens": MAX_TOKENS,
    "repetition_penalty": FiniteFloatRange(0, min_open=True),  # logits are divided by it
    "parse_retries": click.IntRange(0),
    "parse_retry_temperature": FiniteFloatRange(0, min_open=True),  # a greedy retry returns the same reply
    "text_field": click.STRING,
    "id_field": click.STRING,
    "encoding_errors": click.Choice(["strict", "replace"]),
}

#: How the input is read, the same for every method: ``--text-field``, ``--id-field``, ``--encoding-errors``
#: (flags, pipeline ``options:``); the CLI's flags and the unit reader both take their defaults from here.
INPUT_DEFAULTS: dict[str, str] = {"text_field": "text", "id_field": "id", "encoding_errors": "strict"}

#: Run-wide settings given on the command line or at a pipeline file's top level.
CONCURRENCY = click.IntRange(1)
DEFAULT_CONCURRENCY = 8  # model calls in flight (local llama.cpp runs one at a time)
LIMIT = click.IntRange(0)

#: Method options several methods share.
SHOTS = click.IntRange(0)  # 0: zero-shot, no seed examples in the prompt
MIN_WORDS = click.IntRange(0)  # 0: keep segments of any length
MAX_WORDS = click.IntRange(1)
SCORE = FiniteFloatRange()  # a score threshold; pmi scores may be negative
PERCENT = FiniteFloatRange(0, 100, min_open=True)
SHARE = FiniteFloatRange(0, 1)  # a ROUGE-L or repetition share

__all__ = ["FiniteFloatRange", "GENERAL_OPTIONS", "CONCURRENCY", "DEFAULT_CONCURRENCY", "INPUT_DEFAULTS", "LIMIT", "MAX_TOKENS", "SHOTS", "MIN_WORDS", "MAX_WORDS", "SCORE", "PERCENT", "SHARE"]

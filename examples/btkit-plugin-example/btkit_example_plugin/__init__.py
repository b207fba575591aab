"""An example third-party btkit plugin, installed separately from btkit and importing only ``btkit.*``.

The hooks below are the whole plugin; the entry point ``quiz = "btkit_example_plugin"`` in
pyproject.toml makes btkit find them. They add

- a method, ``quiz`` (:mod:`.quiz`): one stage that writes a quiz question each passage answers,
  with its template shipped inside this package (``prompts/quiz/ask.j2``, overridable with
  ``--prompts DIR`` like any other);
- a backend, ``cloze:`` (:mod:`.cloze`): a rule that writes fill-in-the-blank questions, so the
  method runs without a model (``btkit run quiz CORPUS -o OUT --model cloze:``);
- a record filter (``btkit_after_stage``): quiz questions that do not end with a question mark are
  dropped as ``not_a_question``.

Nothing in btkit itself was edited to add them. The tests (``tests/``) use the pytest plugin btkit
ships for plugin authors.
"""

from __future__ import annotations

from typing import Any, Callable

from btkit.hookspecs import hookimpl

from .cloze import ClozeBackend
from .quiz import quiz_method


@hookimpl
def btkit_register_methods(register: Callable[..., None]) -> None:
    register(quiz_method())


@hookimpl
def btkit_register_backends(register: Callable[..., None]) -> None:
    register("cloze", ClozeBackend, description="example plugin: a rule writes fill-in-the-blank questions, no model (cloze:MIN_LENGTH)")


@hookimpl
def btkit_after_stage(record: Any, stage: Any, run: Any) -> str | None:
    """A filter: drop quiz questions that are not questions (the reason is counted in stats.json)."""
    if stage.method == "quiz" and not record.fields.get("instruction", "").rstrip().endswith("?"):
        return "not_a_question"
    return None

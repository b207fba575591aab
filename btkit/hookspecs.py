"""Hook specifications: the whole contract between btkit's core and its plugins.

Registration hooks hand plugins a ``register`` callback (as simonw/llm does) so the core owns
validation and name clashes. Record and stage hooks let a plugin observe or change what flows
through a run, e.g. a filter plugin that drops records by returning a reason.
Hooks are always called with keyword arguments.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("btkit")
hookimpl = pluggy.HookimplMarker("btkit")


@hookspec
def btkit_register_backends(register: Callable[..., None]) -> None:
    """Register backend factories: ``register(prefix, factory, description=...)``.

    ``factory(rest, options) -> Backend`` gets the part of the model spec after the first colon
    (``llamacpp:/m.gguf`` -> ``/m.gguf``) and a dict of backend options (base_url, ...).
    """


@hookspec
def btkit_register_methods(register: Callable[..., None]) -> None:
    """Register methods: ``register(method)`` where ``method`` is a :class:`btkit.methods.Method`."""


@hookspec
def btkit_register_commands(cli: Any) -> None:
    """Add click commands to the ``btkit`` CLI group: ``cli.add_command(...)``."""


@hookspec
def btkit_run_start(run: Any) -> None:
    """Called once before the first record of a run is processed."""


@hookspec
def btkit_run_end(run: Any, stats: dict) -> None:
    """Called once after a run finished, just before ``stats.json`` is written from ``stats``.

    ``data.jsonl`` is published by then. A plugin may add a section of its own to ``stats`` (a key
    named after it, e.g. LINGUIST's per-intent report); it must not change btkit's own keys.
    """


@hookspec
def btkit_before_stage(record: Any, stage: Any, run: Any) -> str | None:
    """Called before ``stage`` processes ``record``. May change ``record.fields`` in place.

    Return a string to drop the record with that reason (a filter plugin); None to keep it.
    """


@hookspec
def btkit_after_stage(record: Any, stage: Any, run: Any) -> str | None:
    """Called for each record ``stage`` produced that is still alive. May change it in place.

    Return a string to drop the record with that reason; None to keep it.
    """

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
def btkit_register_export_formats(register: Callable[..., None]) -> None:
    """Register ``btkit export`` formats: ``register(name, writer, description="", suffix=".jsonl")``.

    ``writer(rows, out, options) -> dict`` gets the run's ``data.jsonl`` rows (a list of dicts), the
    output path ``out`` (a :class:`pathlib.Path`; a file, or a folder for a format that writes one) and
    the command's options (``split``, ``split_seed``, ``preference``, ``run_dir``...). It returns a
    summary: counts (e.g. ``{"rows": 120, "train": 108, "validation": 12}``) and ``warnings``, a list of
    lines such as "format X has no place for field Y", each said once however many rows it concerns.
    ``suffix`` is the file ending ``-o`` gets when none is given (``""`` for a folder).
    """


@hookspec
def btkit_register_report_sections(register: Callable[..., None]) -> None:
    """Register sections of the ``btkit report`` page: ``register(name, render, order=100)``.

    ``render(run_dir, context) -> str | None`` gets the run directory (a :class:`pathlib.Path`) and a
    dict the report shares between sections (the run's files read once); it returns an HTML fragment,
    or None when the section has nothing to show for this run. Sections appear sorted by ``order``
    (then name).
    """


@hookspec
def btkit_register_executors(register: Callable[..., None]) -> None:
    """Register executors for ``btkit run ... --shards N --executor NAME``: ``register(name, factory, description="")``.

    ``factory(options) -> Executor`` gets the ``-E KEY=VALUE`` options as a dict and returns a
    :class:`btkit.executors.Executor`, whose ``run(jobs, poll)`` runs every shard job to completion
    (each job is a whole shard run: :func:`btkit.executors.run_shard_job`). Import heavy libraries
    (ray, a cluster client) inside ``run``, never at module level.
    """


@hookspec
def btkit_run_start(run: Any) -> None:
    """Called once before the first record of a run is processed."""


@hookspec
def btkit_run_end(run: Any, stats: dict) -> None:
    """Called once after a run finished, just before ``stats.json`` is written from ``stats``.

    Not called for one shard of a sharded run: once, by the merge, for the whole run.

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

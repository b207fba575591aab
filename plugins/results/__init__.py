"""Results people can train from, share and look at: ``btkit export`` (formats are plugins), the
dataset card every finished run gets (``README.md``), and ``btkit report`` / ``btkit view``.

Registered like any third-party plugin (entry-point group ``btkit.commands``, name ``results``).
The report and the viewer live in their own modules (``report``, ``view``); when one is missing or
cannot be imported, ``export`` and the dataset card still work (the import is guarded).
"""

from __future__ import annotations

from typing import Any

from btkit.hookspecs import hookimpl

from .export import FORMATS, export_command

def _optional(module: str, *names: str) -> tuple[Any, ...]:
    """``names`` from a sibling module, or Nones when that module is absent (a missing module is
    silent; one that fails to import says so in one line, and export still works)."""
    import importlib
    import sys

    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            print(f"warning: btkit {module}: {e}; the {module} command is unavailable", file=sys.stderr)
        return (None,) * len(names)
    except Exception as e:  # noqa: BLE001 (a broken report must not take export down)
        print(f"warning: btkit {module} failed to load: {type(e).__name__}: {e}", file=sys.stderr)
        return (None,) * len(names)
    return tuple(getattr(mod, n, None) for n in names)


# The HTML report (its command and sections; plots are imported inside them) and the terminal viewer.
SECTIONS, report_command = _optional("report", "SECTIONS", "report_command")
(view_command,) = _optional("view", "view_command")


@hookimpl
def btkit_register_commands(cli: Any) -> None:
    cli.add_command(export_command)
    for command in (report_command, view_command):
        if command is not None:
            cli.add_command(command)


@hookimpl
def btkit_register_export_formats(register: Any) -> None:
    for name, (writer, description, suffix) in FORMATS.items():
        register(name, writer, description=description, suffix=suffix)


@hookimpl
def btkit_register_report_sections(register: Any) -> None:
    """``SECTIONS`` of the report module: ``(name, render, order)`` tuples or dicts with those keys."""
    for section in SECTIONS or []:
        if isinstance(section, dict):
            register(section["name"], section["render"], order=section.get("order", 100))
        else:
            register(*section)


@hookimpl
def btkit_run_end(run: Any, stats: dict) -> None:
    """Every finished run directory gets its dataset card, ``README.md`` (rewritten on every finish)."""
    from .card import write_card

    write_card(run, stats)

"""User-facing errors: one clear line, naming file, line and field where there is one."""

from __future__ import annotations

from typing import IO, Any

import click


class BtkitError(click.ClickException):
    """An error caused by the user's input or setup: every command prints it as one ``error:`` line
    and exits 2. A click exception, so a command (a plugin's too) just raises it."""

    exit_code = 2

    def __init__(self, message: str = ""):
        super().__init__(str(message))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


class Interrupted(BtkitError):
    """Ctrl-C (SIGINT): the run stopped cleanly and resumes on the same command; exit 130 as shells expect."""

    exit_code = 130


class InputError(BtkitError):
    """Bad corpus or seed input. The message names file, line and field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        where = str(path) + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")
        self.path, self.line, self.field = path, line, field


class TemplateError(BtkitError):
    """A prompt template that cannot be used (missing, undefined variable, unsafe)."""


class BackendError(Exception):
    """A backend call that failed. ``raw`` keeps whatever the backend sent back, for the failure log.

    ``attempts``: how many requests the backend sent for this call (retries included), so stats
    count what a server saw; ``shared``: the failure of an identical call another record was
    already waiting on (no request of its own).
    """

    def __init__(self, message: str, raw: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.raw = raw
        self.attempts = attempts
        self.shared = False


class CapabilityError(BtkitError):
    """The chosen backend cannot do what a stage needs (e.g. logprobs)."""


__all__ = ["BtkitError", "Interrupted", "InputError", "TemplateError", "BackendError", "CapabilityError"]

"""What a running job shows: a progress bar on a terminal, a status line every N seconds elsewhere,
and btkit's log warnings on stderr for users who set up no logging."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any


def progress_text(progress: dict[str, Any]) -> str:
    """The progress bar's counts: records kept and dropped, failed calls, tokens (and cost) of this
    invocation's calls, then the records each stage finished (``augment=12 curate=10``)."""
    text = f"kept={progress['kept']} dropped={progress['dropped']}"
    if progress.get("failed"):
        text += f" failed={progress['failed']}"
    text += f" tokens={_short(progress['tokens_in'])}+{_short(progress['tokens_out'])}"
    if progress.get("cost_usd"):
        text += f" cost=${progress['cost_usd']:.4f}"
    stages = progress.get("stages") or {}
    if stages:
        names = [label.rsplit(".", 1)[-1] for label in stages]
        if len(set(names)) < len(names):  # two methods with a stage of one name: keep the method
            names = list(stages)
        text += " | " + " ".join(f"{n}={v}" for n, v in zip(names, stages.values()))
    return text


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 10**6 else f"{n / 1e3:.1f}k" if n >= 10**4 else str(n)


class Progress:
    """Progress of finished units (in any order) against the units left to do.

    On a terminal: a tqdm bar with units done/total, rate and ETA, and :func:`progress_text` (kept,
    dropped, failed calls, tokens, cost, records per stage). Otherwise (a log file, CI, ``nohup``)
    no bar, nothing redrawn: one status line every ``every`` seconds ($BTKIT_STATUS_EVERY, default
    30; 0 for none), so a stalled server is visible there too. Silent when quiet.
    """

    def __init__(self, quiet: bool, total: int, every: float):
        self.bar = None
        self.every = 0.0 if quiet else float(every or 0)
        self.total = total
        self.t0 = time.monotonic()
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc="units", unit="unit", total=total, dynamic_ncols=True, file=sys.stderr)
            self.every = 0.0

    def restart(self, progress: dict[str, Any], total: int) -> None:
        """Count a new pass (the second pass of a run with a whole-run cut) from zero."""
        progress.update(finished=0, total=total)
        self.total, self.t0 = total, time.monotonic()
        if self.bar is not None:
            self.bar.reset(total=total)

    def update(self, progress: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(progress_text(progress), refresh=False)

    async def tick_every(self, progress: dict[str, Any]) -> None:
        """Print :func:`status_line` every ``every`` seconds until cancelled (no terminal only)."""
        if self.every <= 0:
            return
        while True:
            await asyncio.sleep(self.every)
            print(status_line(progress, time.monotonic() - self.t0), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def status_line(progress: dict[str, Any], elapsed: float) -> str:
    """``progress: 12/40 units (30%), 0.52 units/s, ETA 54s, kept=... dropped=... failed=... tokens=... cost=... | augment=12 curate=10``"""
    done, total = progress["finished"], progress["total"]
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total >= done else ""
    return f"progress: {done}/{total} units{pct}, {rate:.2f} units/s{eta}, {progress_text(progress)}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner may swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(f"warning: {self.format(record)}", file=sys.stderr)
        except Exception:  # noqa: BLE001 (logging must never break a run)
            self.handleError(record)


def log_warnings_to_stderr() -> None:
    """btkit's warnings (a retried request, say) reach a user who has no logging set up, TTY or not."""
    logger = logging.getLogger("btkit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        logger.addHandler(handler)

"""Executors: what runs the shards of ``btkit run ... --shards N`` (without ``--shard K``), then merges.

An executor is a plugin (``btkit_register_executors``): ``local`` starts one ``btkit`` process per
shard on this machine, ``ray`` one Ray task per shard on a Ray cluster. Both get the same
:class:`ShardJob` list; each job is a whole shard run (:func:`run_shard_job`, its own run
directory, journal and resume), so an executor only has to run it somewhere that sees the shard
directories and run it again if it dies: the retried shard resumes its journal, and its finished
calls come back from the cache. While the shards run, the driver (:func:`run_sharded`) shows their
progress from their journals; when all are complete it merges them (:func:`btkit.shards.merge`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import BtkitError
from .shards import JournalTail, check_layout, config_from_dict, config_to_dict, merge, shard_dir

#: Exit status of a shard process that stopped on a configuration or input problem: retrying cannot help.
NOT_RETRYABLE = 3


@dataclass
class ShardJob:
    """One shard to run: its number, the shard count, its run directory and its settings (JSON)."""

    shard: int
    shards: int
    dir: Path
    config: dict[str, Any]


class ShardFailed(BtkitError):
    """A shard stopped on a problem no retry can fix (bad input, bad option): its one line."""


class Executor:
    """Runs every :class:`ShardJob` to completion, retrying a shard whose process or task died.

    ``run`` calls ``poll()`` every second or so while it waits (the driver's progress line) and
    returns what the manifest should record about it (timings, retries). It raises
    :class:`ShardFailed` for a shard that failed in a way a retry cannot fix, and a
    :class:`btkit.errors.BtkitError` when a shard still fails after its retries.
    """

    name = ""

    def __init__(self, options: dict[str, Any]):
        self.options = dict(options)

    def run(self, jobs: list[ShardJob], poll: Callable[[], None]) -> dict[str, Any]:
        raise NotImplementedError


def run_shard_job(config: dict[str, Any]) -> dict[str, Any]:
    """Run one shard in this process (what a shard process or a Ray task does); returns its counts."""
    import os

    from .engine import run_pipeline
    from .plugins import get_registry

    if config.get("cwd") and Path(config["cwd"]).is_dir():
        os.chdir(config["cwd"])  # where the driver ran: relative paths in options mean the same
    stats = run_pipeline(config_from_dict(config), get_registry())
    return {k: stats.get(k) for k in ("units", "kept", "dropped", "calls", "this_invocation_s")}


def shard_jobs(config: Any, n: int) -> list[ShardJob]:
    """One job per shard of ``config`` split into ``n`` shards."""
    jobs = []
    for k in range(n):
        d = shard_dir(Path(config.out_dir).resolve(), k, n)
        shard_config = dataclasses.replace(config, out_dir=d, shard=(k, n), quiet=True)
        jobs.append(ShardJob(k, n, d, config_to_dict(shard_config)))
    return jobs


class ShardWatch:
    """The driver's view of running shards, read from their journals (appended bytes only, so cheap)."""

    def __init__(self, jobs: list[ShardJob], quiet: bool, every: float = 5.0):
        self.jobs, self.quiet, self.every = jobs, quiet, every
        self.tails = [JournalTail(job.dir / "candidates.jsonl") for job in jobs]
        self.t0 = time.monotonic()
        self.shown = 0.0

    def read(self) -> None:
        for tail in self.tails:
            tail.read()

    def complete(self) -> int:
        return sum((job.dir / "shard.json").exists() for job in self.jobs)

    def line(self) -> str:
        units = [t.units for t in self.tails]
        return (f"shards: {self.complete()}/{len(self.jobs)} complete, {sum(units)} units journalled "
                f"({' '.join(str(u) for u in units)}), {sum(t.kept for t in self.tails)} records alive, {time.monotonic() - self.t0:.0f}s")

    def poll(self, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not final and now - self.shown < self.every:
            return
        self.shown = now
        self.read()
        end = "\n" if final or not sys.stderr.isatty() else "\r"
        print(self.line(), file=sys.stderr, end=end, flush=True)


def run_sharded(config: Any, registry: Any, n: int, executor: str, options: dict[str, Any]) -> dict[str, Any]:
    """``btkit run ... --shards N`` without ``--shard``: the executor runs every shard, then they are merged."""
    overwrite = config.overwrite
    check_layout(config.out_dir, n)
    factory = registry.executor(executor)
    runner = factory.factory(options)
    if config.overwrite:  # once, here: a shard started again after a kill must resume, not start over
        start_over(config, n)
        config = dataclasses.replace(config, overwrite=False)
    jobs = shard_jobs(config, n)
    for job in jobs:
        job.dir.mkdir(parents=True, exist_ok=True)
    watch = ShardWatch(jobs, config.quiet, every=min(5.0, config.status_every or 5.0))
    t0 = time.monotonic()
    info = runner.run(jobs, watch.poll) or {}
    watch.poll(final=True)
    info = {"name": executor, "shards_s": round(time.monotonic() - t0, 3), **info}
    return merge(config.out_dir, registry, overwrite=overwrite, quiet=config.quiet, executor=info)


def start_over(config: Any, n: int) -> None:
    """``--overwrite`` with ``--shards N``: every shard's files (and an earlier merge's) moved aside, each
    under its run's lock, so no running shard is touched."""
    from .rundir import RunLock, move_aside

    for d in [shard_dir(Path(config.out_dir), k, n) for k in range(n)]:
        if d.exists():
            lock = RunLock(d).acquire()
            try:
                move_aside(d)
            finally:
                lock.release()


def main() -> None:
    """``python -m btkit.executors``: run the shard whose settings (JSON) come on standard input.

    What the ``local`` executor starts per shard (settings on stdin, so no credential is written to
    disk or shown in a process list). Exit status :data:`NOT_RETRYABLE` with one ``error:`` line for a
    problem a retry cannot fix."""
    import json

    config = json.loads(sys.stdin.read())
    try:
        run_shard_job(config)
    except BtkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(NOT_RETRYABLE)


if __name__ == "__main__":
    main()


__all__ = ["Executor", "NOT_RETRYABLE", "ShardFailed", "ShardJob", "ShardWatch", "run_shard_job", "run_sharded", "shard_jobs"]

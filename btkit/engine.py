"""The engine: streams work units through a list of stages and writes results as they finish.

Shape of a run directory:
- ``candidates.jsonl`` is the journal: every record the run produced, kept or dropped with its
  reason, appended in input order, whole finished units per ``os.write``. It is the only source of
  truth: ``data.jsonl``, ``stats.json`` and ``failures.jsonl`` are all derived from it, which makes
  resume after ``kill -9`` simple (cut a torn last line, skip finished units, rebuild the rest).
  Each line carries ``unit_seq`` (the unit's position in the input) and ``unit_records`` (how
  many lines its unit has): a kill can cut a multi-line write short (Linux checks for fatal
  signals between pages), and a last unit with fewer lines than announced is cut and redone.
- ``data.jsonl`` appears only when a run is complete (written as ``data.jsonl.partial`` while it
  runs, then renamed), so a reader never mistakes a half-written file for a finished one.
- ``spent.json`` (only when a backend reports costs) adds up what every invocation's calls cost,
  which ``--max-cost`` counts against; plugins add their own files at the end (the results
  plugin's dataset card, ``README.md``).
- ``run.json`` records the settings, written first; re-running the same command continues the
  run. Finished units are always the first N of the deterministic unit stream, so resuming skips
  N units in constant memory, after checking that their ids and contents hash the same (an input
  edited in place stops the run instead of mixing two inputs).

Every model call goes through the content-addressed cache (:mod:`btkit.cache`) and is written there
the moment it returns, so a resumed run pays only for calls that were in flight at the kill.
Identical requests in flight at once are sent once. A stage that returns no record for a record
gets it recorded as dropped (``no_output``), never silently lost.

Memory stays flat: units are read lazily and at most ``window`` are in flight; finished units are
written in input order through a small reorder buffer; units dropped while preparing (too short,
duplicate) cost no task.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from . import __version__, journal
from .backends import Backend, Completion
from .cache import Cache, NullCache
from .calls import Calls, StageCtx
from .config import RunConfig
from .errors import BtkitError, Interrupted
from .io import AppendFile, atomic_write_json
from .methods import Method, Stage
from .plugins import Registry
from .progress import Progress, log_warnings_to_stderr
from .prompts import PromptLibrary
from .records import ExtraUnit, Record, failed_record, journal_key
from .rundir import RunDirectory, public_urls
from .stats import journal_stats
from .stats import write_failures as write_failures_file
from .shards import SHARD_ASSIGNMENT
from .units import UnitSource, unit_digest

HELD_JOURNAL = "candidates.held.jsonl"

__all__ = ["Run", "run_pipeline", "execute_run", "HELD_JOURNAL", "BudgetSpent", "spent_cost", "price_of", "estimate_run", "format_estimate"]


class Run:
    """One execution of a pipeline over an input file into a run directory."""

    def __init__(self, config: RunConfig, registry: Registry, max_cost: float | None = None):
        self.config = config
        #: ``--max-cost``: stop cleanly once the run's spent cost (journal + this invocation) reaches it.
        self.max_cost = max_cost
        #: What the journal's calls cost before this invocation (set at start under ``--max-cost``).
        self.spent_before = 0.0
        self.registry = registry
        self.out = Path(config.out_dir)
        self.first_method: Method = registry.method(config.stages[0].method)
        self.stages: list[Stage] = []
        for spec in config.stages:
            method = registry.method(spec.method)
            known = {s.name for s in method.stages}
            if spec.stage not in known:
                raise BtkitError(f"method '{spec.method}' has no stage '{spec.stage}'; its stages: {', '.join(sorted(known))}")
            self.stages.append(method.stage_with_defaults(spec.stage, {**config.options, **spec.options}))
        #: The run-wide templates; a stage with override folders of its own gets its own library.
        self.prompts = PromptLibrary(roots=registry.prompt_roots(), overrides=config.prompt_overrides)
        self._stage_prompts = {
            id(stage): PromptLibrary(roots=registry.prompt_roots(), overrides=[*spec.prompt_overrides, *config.prompt_overrides])
            for stage, spec in zip(self.stages, config.stages) if spec.prompt_overrides
        }
        self.cache = (Cache(config.cache_path) if config.use_cache else NullCache())
        self.calls = Calls(self.cache, config)
        self.source = UnitSource(config, self.first_method)
        self.dir = RunDirectory(self.out, command=config.command)
        self._backends: dict[str, Backend] = {}
        self._stage_backends: dict[int, Backend] = {}
        self.live_counts: dict[str, collections.Counter] = {}
        self.progress: dict[str, Any] = {"finished": 0, "total": 0, "kept": 0, "dropped": 0, "skipped": 0,
                                         "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0, "failed": 0,
                                         "stages": {label: 0 for label in dict.fromkeys(s.label for s in self.stages)}}
        self.retried_units = 0
        self._appends_in_order = True
        #: False for a merge: units whose calls failed stay as the shards recorded them (re-running that
        #: shard retries them) instead of being redone here.
        self.retry_failed = True
        #: Called with the journal's path under the run's lock, before resuming from it: a merge writes
        #: the shards' journals there (:func:`btkit.shards.merge`).
        self.journal_source: Callable[[Path], None] | None = None
        #: False when no unit is left to process and nothing after a whole-run cut (a merge of complete
        #: shards): backends are then neither made nor checked, so a merge needs no model or server.
        self.calls_expected = True
        #: Sections added to stats.json besides the journal's counts (a merge adds ``shards``).
        self.stats_sections: dict[str, Any] = {}

    # -- setup -----------------------------------------------------------------------------
    def model_for(self, stage: Stage) -> str:
        return stage.model or self.config.model

    def backend_for(self, stage: Stage) -> Backend:
        """The stage's backend; stages with the same spec and options share one (and its limiter)."""
        backend = self._stage_backends.get(id(stage))
        if backend is None:
            spec = self.model_for(stage)
            opts = {**self.config.backend_options, **{k: v for k, v in stage.options.items() if k in ("base_url",) and v}}
            key = spec + "|" + json.dumps(opts, sort_keys=True, default=str)
            if key not in self._backends:
                self._backends[key] = self.registry.make_backend(spec, opts)
            backend = self._stage_backends[id(stage)] = self._backends[key]
        return backend

    def prompts_for(self, stage: Stage) -> PromptLibrary:
        return self._stage_prompts.get(id(stage), self.prompts)

    def count_usage(self, comp: Completion) -> None:
        """Tokens and cost of a call that reached the model, for the progress display."""
        self.progress["tokens_in"] += comp.prompt_tokens
        self.progress["tokens_out"] += comp.completion_tokens
        self.progress["cost_usd"] += float(comp.extra.get("cost") or 0.0)

    def check_templates(self) -> None:
        """Every template a stage uses exists, parses and has all its variables: before any call."""
        for stage in self.stages:
            for name in stage.templates:
                self.prompts_for(stage).check_variables(name, stage.variables)

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change results. Not included: limit, concurrency, quiet, cache location."""
        st = self.config.input.stat()
        templates = {}
        for s in self.stages:
            lib = self.prompts_for(s)
            for n in s.templates:  # a stage's own override is told apart from the run-wide template
                templates[n if lib is self.prompts else f"{s.label}:{n}"] = lib.template_hash(n)
        return {
            "btkit": __version__,
            "input": {"path": str(self.config.input.resolve()), "size": st.st_size},
            "model": self.config.model,
            "backend_options": public_urls({k: v for k, v in self.config.backend_options.items() if "key" not in k.lower()}),
            "stages": [{"method": s.method, "stage": s.stage, "options": _jsonable(public_urls({**self.config.options, **s.options}))} for s in self.config.stages],
            "templates": templates,
            **({"shard": {"shard": self.config.shard[0], "shards": self.config.shard[1], "assignment": SHARD_ASSIGNMENT}}
               if self.config.shard is not None else {}),
        }

    # -- resume ------------------------------------------------------------------------------
    def _resume(self, surveyed: int | None = None) -> tuple[journal.JournalScan, int]:
        """Survey the input against the journal, then make the journal one sorted run without failed units.

        Units whose calls failed (``backend_error``, ``stage_error``) are redone: re-running after
        an outage retries what failed, and every call that succeeded comes back from the cache.
        ``data.jsonl.partial`` is rebuilt from the journal, and a published ``data.jsonl`` is
        withdrawn only when there is work left to do.
        """
        path = self.out / "candidates.jsonl"
        found = journal.scan(path)
        if not self.retry_failed:
            found.failed.clear()
        n_units = surveyed if surveyed is not None and not found.units else self.source.survey(path, found)
        self.retried_units = len(found.failed)
        if found.failed or not found.sorted:
            journal.rewrite(path, journal.iter_sorted(path, found, skip=found.failed.__contains__))
            found = journal.scan(path)
        self._appends_in_order = found.gapless  # else units redone now land after later ones: sorted at the end
        if self.config.shard is None:  # a shard publishes no data: the merge decides what is kept
            self._rebuild_data(found)
        if found.units < n_units:
            (self.out / "data.jsonl").unlink(missing_ok=True)  # re-published when the run completes
        return found, n_units

    def _output_line(self, record: Record, method_name: str) -> dict[str, Any]:
        return self.registry.method(method_name).to_output(record)

    # -- execution -------------------------------------------------------------------------
    async def process_unit(self, unit: Record, stages: list[Stage] | None = None) -> list[Record]:
        """The unit's records after ``stages`` (default: all): dropped ones with their reason, the rest alive."""
        if isinstance(unit, ExtraUnit):
            return list(unit.records)
        if not unit.alive:  # dropped while preparing (too short, duplicate...)
            return [unit]
        return await self._through(self.stages if stages is None else stages, [unit])

    async def _through(self, stages: list[Stage], alive: list[Record]) -> list[Record]:
        terminal: list[Record] = []
        for stage in stages:
            if len(alive) == 1:  # the common case: no gather, no extra task
                results = [await self._run_stage(stage, alive[0])]
            else:
                results = await asyncio.gather(*(self._run_stage(stage, r) for r in alive))
            alive = []
            for outs in results:
                for rec in outs:
                    (alive if rec.alive else terminal).append(rec)
            if not alive:
                break
        return terminal + alive

    async def _run_stage(self, stage: Stage, record: Record) -> list[Record]:
        hook = self.registry.hook
        for reason in hook.btkit_before_stage(record=record, stage=stage, run=self):
            if reason:
                return [record.drop(stage.label, str(reason))]
        try:
            outs = await stage.process(record, StageCtx(self, stage, record))
        except BtkitError:  # configuration problems stop the run with their message
            raise
        except Exception as e:  # a backend fault, or a bug in a stage, loses one record, not the run
            self._count_stage(stage, failed=True)
            return [failed_record(record, stage.label, e)]
        self._count_stage(stage, failed=False)
        if not outs:  # a stage that returns nothing would make the record vanish: record why instead
            return [record.drop(stage.label, "no_output")]
        for rec in outs:
            if rec.alive:
                for reason in hook.btkit_after_stage(record=rec, stage=stage, run=self):
                    if reason:
                        rec.drop(stage.label, str(reason))
                        break
        return outs

    def _count_stage(self, stage: Stage, failed: bool) -> None:
        """Records a stage finished (and failed) in this invocation, for the progress display."""
        stages = self.progress["stages"]
        stages[stage.label] = stages.get(stage.label, 0) + 1
        self.progress["failed"] += failed

    def _check_budget(self) -> None:
        """After each call that reached a model: stop the run cleanly once ``--max-cost`` is spent."""
        if self.max_cost is None or self.calls.closed is not None:
            return
        spent = self.spent_before + float(self.progress["cost_usd"])
        if spent >= self.max_cost:
            self.calls.closed = BudgetSpent(self.budget_message(spent))
            self.calls.stop(self.calls.closed)

    def _save_spend(self) -> None:
        """Add this invocation's paid calls to ``spent.json`` (what ``--max-cost`` counts on the next run:
        calls of units that were in flight at a stop are paid but in no journal)."""
        cost = float(self.progress["cost_usd"])
        if cost <= 0:
            return
        before = self.spent_before if self.max_cost is not None else recorded_spend(self.out)
        atomic_write_json(self.out / SPENT_FILE, {"started": _run_started(self.out), "cost_usd": round(before + cost, 9),
                                                  "note": "dollars paid for this run's model calls, every invocation"})

    def budget_message(self, spent: float) -> str:
        return (f"--max-cost {self.max_cost:g}: ${spent:.6f} spent, the limit is reached; stopped. Finished units are kept in "
                f"{self.out}: re-run the same command with a higher --max-cost (or without it) to continue "
                f"(calls already paid come from the cache)")

    def _unit_done(self, task: asyncio.Future) -> None:
        """A unit finished (in any order): progress counts it now, and a config error stops the run."""
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            self.calls.stop(error)
            return
        self.progress["finished"] += 1
        records = task.result()
        kept = sum(1 for r in records if r.alive)
        self.progress["kept"] += kept
        self.progress["dropped"] += len(records) - kept
        self.bar.update(self.progress)

    async def _wait_for_head(self, in_flight: collections.deque) -> None:
        """Wait until the oldest unit is done (the only one the reorder buffer can write), or the run must stop.

        Waiting on "any unit" instead would return at once whenever a later unit is already done
        and spin the loop, taking a core from the model.
        """
        head, fatal = in_flight[0][2], self.calls.fatal
        if not head.done():
            await asyncio.wait([head, fatal], return_when=asyncio.FIRST_COMPLETED)
        if fatal.done():
            fatal.result()  # raises the reason

    def check(self) -> None:
        """Templates and backends, before any work: a typo, a missing template variable or a missing
        capability stops here (every model spec is resolved now)."""
        self.check_templates()
        if not self.calls_expected:
            return
        for stage in self.stages:
            stage.check_backend(self.backend_for(stage))

    async def execute(self) -> dict[str, Any]:
        """The whole run: checks, survey, resume, every unit through the stages, end-of-run decisions, stats."""
        self.check()
        # A bad input stops the run before its directory is created or touched.
        surveyed = None
        path = self.out / "candidates.jsonl"
        if not path.exists() and self.journal_source is None:
            surveyed = self.source.survey(path, journal.JournalScan())
        else:  # the survey against the journal needs the directory's lock: check the rows alone first
            self.source.validate()
        self.dir.open(self.fingerprint(), self.config.overwrite, self.config.quiet)
        try:
            return await self._execute_locked(surveyed)
        finally:
            self.dir.release()

    async def aclose(self) -> None:
        """Close every backend this run opened, and the cache (``execute`` does it itself; for a caller
        that drives stages with :meth:`process_unit` alone, as ``btkit eval-judge`` does)."""
        for backend in self._backends.values():
            await backend.aclose()
        self.cache.close()

    async def _execute_locked(self, surveyed: int | None) -> dict[str, Any]:
        cfg = self.config
        path = self.out / "candidates.jsonl"
        if self.journal_source is not None:
            self.journal_source(path)
        found, n_units = self._resume(surveyed)
        if not cfg.quiet and self.calls_expected:
            for stage in self.stages:  # after the input checks: a bad input still fails with its one line
                line = stage.announce(self.backend_for(stage))
                if line:
                    print(line, file=sys.stderr)
        if self.max_cost is not None:
            self.spent_before = max(recorded_spend(self.out), spent_cost(self.out))
            if self.spent_before >= self.max_cost and found.units < n_units:
                raise BudgetSpent(self.budget_message(self.spent_before))
            self.calls.after_call = self._check_budget
            if not cfg.quiet:
                unpriced = sorted({self.model_for(st) for st in self.stages if price_of(self.model_for(st)) is None})
                if unpriced:
                    print(f"warning: --max-cost: no price is known for {', '.join(unpriced)}; its calls count $0 "
                          f"unless the backend reports a cost", file=sys.stderr)
        self.registry.hook.btkit_run_start(run=self)
        t0 = time.monotonic()
        self.calls.start()
        self.progress["total"] = n_units - found.units
        self.progress["skipped"] = found.units
        self.bar = Progress(cfg.quiet, self.progress["total"], cfg.status_every)
        ticker = asyncio.ensure_future(self.bar.tick_every(self.progress))
        hold = self.hold_index()
        shard = cfg.shard is not None
        try:
            finished = journal.unit_headers(journal.iter_sorted(path, found))
            await self._stream(self._first_pass_work(finished, hold), path, None if shard else self.out / "data.jsonl.partial",
                               t0, hold_alive=hold is not None)
            if hold is not None and not shard:  # a shard stops before the cut: the merge makes it over every shard
                await self._second_pass(hold, t0)
        finally:
            ticker.cancel()
            self.bar.close()
            for backend in self._backends.values():
                await backend.aclose()  # after every unit unwound (see _stream): llama.cpp frees under no thread
            self.dir.save_elapsed(t0)
            self._save_spend()
        if shard:
            return self._finish_shard(n_units, time.monotonic() - t0)
        self._finish_journal()
        os.replace(self.out / "data.jsonl.partial", self.out / "data.jsonl")
        stats = self.stats(time.monotonic() - t0, write_failures=True)
        self.registry.hook.btkit_run_end(run=self, stats=stats)  # a plugin may add its own section first
        atomic_write_json(self.out / "stats.json", stats)
        self.cache.close()
        return stats

    def _finish_shard(self, n_units: int, elapsed: float) -> dict[str, Any]:
        """A shard's end: its journal in input order, its own counts, and ``shard.json`` written last.

        No end-of-run decision is made and no data is published here: keep-top, de-duplication
        across units and the stages after a whole-run cut need every shard's records in view,
        which only the merge has (:func:`btkit.shards.merge`). ``shard.json`` says the shard is
        complete and holds what the merge needs: the run's settings and the journal's digest.
        """
        from .shards import write_shard_marker

        path = self.out / "candidates.jsonl"
        found = journal.scan(path)
        if not found.sorted:
            journal.rewrite(path, journal.iter_sorted(path, found))
        (self.out / "data.jsonl.partial").unlink(missing_ok=True)
        stats = {**self.stats(elapsed, write_failures=True), "status": "shard_complete"}
        atomic_write_json(self.out / "stats.json", stats)
        write_shard_marker(self.out, self.config, n_units)
        self.cache.close()
        return stats

    def hold_index(self) -> int | None:
        """The first stage, other than the last, whose end-of-run cut (``Stage.cuts_at_end``) later stages wait for.

        With one (e.g. ``--keep-top`` before Back-and-Forth's rewrite), the run goes in two passes:
        every unit through the stages up to it, then the cut over the whole run, then only the
        records that survive it through the rest, so no call is spent on a record the cut drops.
        """
        for i, stage in enumerate(self.stages[:-1]):
            if stage.cuts_at_end:
                return i
        return None

    def _first_pass_work(self, finished: Iterator[tuple[int, str]], hold: int | None) -> Iterator[tuple[int, Record, str, Any]]:
        """``(seq, unit, digest, work)`` for every unit not finished by an earlier invocation."""
        stages = self.stages if hold is None else self.stages[:hold + 1]
        next_finished = next(finished, None)
        for seq, unit in self.source.as_surveyed():
            if next_finished is not None and next_finished[0] == seq:
                next_finished = next(finished, None)
                continue
            digest = unit_digest(unit)  # before any stage touches the unit's fields
            if not isinstance(unit, ExtraUnit) and not unit.alive:  # dropped while preparing: no task needed
                yield seq, unit, digest, [unit]
            else:
                yield seq, unit, digest, self.process_unit(unit, stages)

    async def _stream(self, work: Iterator[tuple[int, Record, str, Any]], journal_path: Path, data_path: Path | None,
                      t0: float, hold_alive: bool = False, decorate: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Run units with at most ``window`` in flight and journal each finished unit, in input order.

        ``work`` is a coroutine returning the unit's records, or the records themselves. Every
        finished unit at the head of the window goes to the journal in one write (then its kept
        records to ``data_path``); a kill cuts at most the unit being written, which resume redoes.
        With ``hold_alive``, records still alive are journalled ``held`` (a second pass finishes them).
        """
        loop = asyncio.get_running_loop()
        window = max(4, 2 * self.config.concurrency)
        in_flight: collections.deque = collections.deque()
        journal_out = AppendFile(journal_path)
        data = AppendFile(data_path) if data_path is not None else None
        last_saved = time.monotonic()

        def flush_ready() -> None:
            nonlocal last_saved
            journal_lines, data_lines = [], []
            while in_flight and in_flight[0][2].done():
                seq, unit, task, digest = in_flight.popleft()
                records = task.result()
                for r in records:
                    m = self._method_of(r)
                    line = {**r.to_candidate(), "unit": unit.id, "unit_seq": seq, "unit_records": len(records),
                            "unit_hash": digest, "method": m}
                    if hold_alive and r.alive:
                        line["held"] = True
                    elif r.alive and data is not None:
                        data_lines.append(self._output_line(r, m))
                    if decorate is not None:
                        decorate(line)
                    journal_lines.append(line)
            if journal_lines:  # journal first: data.jsonl.partial is rebuilt from it on resume
                journal_out.write_lines(journal_lines)
            if data_lines:
                data.write_lines(data_lines)
            if time.monotonic() - last_saved > 10:
                self.dir.save_elapsed(t0)
                last_saved = time.monotonic()

        try:
            for seq, unit, digest, job in work:
                if isinstance(job, list):
                    task = loop.create_future()
                    task.set_result(job)
                    self._unit_done(task)  # now: a callback would wait for the loop, which need not run at all
                else:
                    task = asyncio.ensure_future(job)
                    task.add_done_callback(self._unit_done)
                in_flight.append((seq, unit, task, digest))
                if self.calls.fatal.done():
                    self.calls.fatal.result()
                flush_ready()
                while len(in_flight) >= window:
                    await self._wait_for_head(in_flight)
                    flush_ready()
            while in_flight:
                await self._wait_for_head(in_flight)
                flush_ready()
        finally:
            pending = [task for _, _, task, _ in in_flight if not task.done()]
            for task in pending:
                task.cancel()
            if pending:  # let cancelled units unwind before their backends close under them
                await asyncio.gather(*pending, return_exceptions=True)
            journal_out.close()
            if data is not None:
                data.close()

    async def _second_pass(self, hold: int, t0: float) -> None:
        """Cut the held records with the whole run in view, then finish the survivors (see :meth:`hold_index`).

        Each unit with held records is journalled again, whole, in ``candidates.held.jsonl`` (its
        own resumable journal); the two journals are merged when every unit is done, the newer
        group of a unit replacing the older.
        """
        path, held_path = self.out / "candidates.jsonl", self.out / HELD_JOURNAL
        found = journal.scan(path)
        drops = self._end_of_run_drops(self.stages[:hold + 1], lambda: journal.iter_sorted(path, found))
        done = journal.scan(held_path)
        if done.failed:  # units whose remaining stages failed are done again (their good calls are cached)
            journal.rewrite(held_path, journal.iter_sorted(held_path, done, skip=done.failed.__contains__))
            done = journal.scan(held_path)
        done_units = journal.unit_headers(journal.iter_sorted(held_path, done))
        rest = self.stages[hold + 1:]

        def work() -> Iterator[tuple[int, Record, str, Any]]:
            next_done = next(done_units, None)
            for seq, lines in journal.units_of(journal.iter_sorted(path, found)):
                if not any(line.get("held") for line in lines):
                    continue
                while next_done is not None and next_done[0] < seq:
                    next_done = next(done_units, None)
                if next_done is not None and next_done[0] == seq:
                    continue
                records, alive = [], []
                for line in lines:
                    rec = Record.from_candidate(line)
                    records.append(rec)
                    if line.get("held"):
                        decided = drops.get(journal_key(line))
                        if decided is not None:
                            label, reason, details = decided
                            rec.drop(label, reason, **details)
                        else:
                            alive.append(rec)
                unit = Record(id=lines[0]["unit"], source_id=lines[0].get("source_id", ""), fields={})
                yield seq, unit, lines[0].get("unit_hash", ""), self._finish_held(records, alive, rest)

        def mark_cut(line: dict[str, Any]) -> None:
            if line["status"] == "dropped" and journal_key(line) in drops:
                line["end_of_run"] = True
                line["cut_before"] = self.stages[hold + 1].label  # it never reached the stages after the cut

        self.bar.restart(self.progress, sum(1 for _, lines in journal.units_of(journal.iter_sorted(path, found))
                                            if any(line.get("held") for line in lines)) - done.units)
        await self._stream(work(), held_path, None, t0, decorate=mark_cut)
        held = journal.scan(held_path)
        newer = journal.unit_headers(journal.iter_sorted(held_path, held))
        replaced = set()  # a few ints per unit with held records; the lines themselves stream
        for seq, _ in newer:
            replaced.add(seq)
        journal.rewrite(path, journal.merge(journal.iter_sorted(path, found, skip=replaced.__contains__),
                                            journal.iter_sorted(held_path, held)))
        held_path.unlink()

    async def _finish_held(self, records: list[Record], alive: list[Record], stages: list[Stage]) -> list[Record]:
        """A unit's records after the cut: the survivors through the remaining stages, the rest as they are."""
        finished = await self._through(stages, alive) if alive else []
        going_on = {id(r) for r in alive}
        return [r for r in records if id(r) not in going_on] + finished

    def _end_of_run_drops(self, stages: list[Stage], lines: Callable[[], Iterator[dict[str, Any]]]) -> dict[str, tuple[str, str, dict[str, Any]]]:
        """``{journal key: (stage label, reason, details)}``: what ``stages`` decide with the whole journal in view."""
        drops: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for stage in stages:
            decided = stage.end_of_run(lines)
            for key, (reason, details) in (decided or {}).items():
                drops.setdefault(key, (stage.label, reason, details))
        return drops

    def _finish_journal(self) -> None:
        """Put the journal in input order and apply end-of-run decisions (``Stage.end_of_run``).

        Drops are written into the journal (rewritten to a temporary file, then renamed) and
        ``data.jsonl.partial`` is rebuilt from it, so stats, failures and a resumed run agree.
        Decisions name records by :func:`btkit.records.journal_key` (unit and id), so a decision
        acts on exactly the record it means.
        """
        path = self.out / "candidates.jsonl"
        scanned: list[journal.JournalScan] = []

        def lines() -> Iterator[dict[str, Any]]:  # a pass over the journal only for a stage that asks for one
            if not scanned:
                scanned.append(journal.scan(path))
            return journal.iter_sorted(path, scanned[0])

        drops = self._end_of_run_drops(self.stages, lines)
        if not drops and self._appends_in_order and self.hold_index() is None:
            return  # written in input order by this invocation and the ones it resumed: nothing to do
        found = scanned[0] if scanned else journal.scan(path)

        def decided_lines() -> Iterator[dict[str, Any]]:
            for line in journal.iter_sorted(path, found):
                if line["status"] == "kept" and journal_key(line) in drops:
                    label, reason, details = drops[journal_key(line)]
                    line.update(status="dropped", dropped_at=label, reason=reason, end_of_run=True)
                    if details:
                        line.setdefault("meta", {}).setdefault("drop_details", {}).update(details)
                yield line

        journal.rewrite(path, decided_lines())
        self._rebuild_data(journal.scan(path))

    def _rebuild_data(self, found: journal.JournalScan) -> None:
        """``data.jsonl.partial`` from the journal's kept records, in input order (temporary file, then renamed)."""
        tmp = self.out / ".data.rebuild"
        tmp.unlink(missing_ok=True)
        kept = (self._output_line(Record.from_candidate(line), line["method"])
                for line in journal.iter_sorted(self.out / "candidates.jsonl", found) if line["status"] == "kept" and not line.get("held"))
        data = AppendFile(tmp)
        try:
            for chunk in _chunks(kept, 512):
                data.write_lines(chunk)
        finally:
            data.close()
        os.replace(tmp, self.out / "data.jsonl.partial")

    def _method_of(self, record: Record) -> str:
        """The method that shapes a kept record's data.jsonl line: the last stage's, unless set."""
        return record.meta.get("output_method") or self.config.stages[-1].method

    # -- stats -----------------------------------------------------------------------------
    def stats(self, elapsed: float, write_failures: bool = False) -> dict[str, Any]:
        """``stats.json``: the journal's counts (:mod:`btkit.stats`) and this invocation's own figures;
        with ``write_failures``, ``failures.jsonl`` is written in the same pass over the journal."""
        path, labels = self.out / "candidates.jsonl", [s.label for s in self.stages]
        counted = write_failures_file(path, labels) if write_failures else journal_stats(path, labels)
        return {
            "status": "complete",
            "btkit": __version__,
            "input": str(self.config.input),
            "model": self.config.model,
            **counted,
            "input_lines_with_replaced_text": self.source.counts.get("replaced_lines", 0),
            "cache_hits_this_invocation": self.cache.hits,
            "model_calls_this_invocation": self.cache.misses,
            "cache_errors": self.cache.errors,
            "units_resumed": self.progress["skipped"],
            "units_retried": self.retried_units,
            "wall_time_s": round(self.dir.elapsed_before + elapsed, 3),
            "this_invocation_s": round(elapsed, 3),
            **self.stats_sections,
        }


class BudgetSpent(BtkitError):
    """``--max-cost`` reached: the run stopped cleanly, finished units kept; a higher limit continues it."""


#: What a run's model calls cost over every invocation (written when a call reported a cost).
SPENT_FILE = "spent.json"


def _run_started(out: Path) -> Any:
    try:
        return json.loads((Path(out) / "run.json").read_text(encoding="utf-8")).get("started")
    except (OSError, ValueError, AttributeError):
        return None


def recorded_spend(out: Path) -> float:
    """``spent.json``'s dollars, if it belongs to the run now in ``out`` (same start), else 0."""
    try:
        d = json.loads((Path(out) / SPENT_FILE).read_text(encoding="utf-8"))
        if d.get("started") == _run_started(out):
            return float(d.get("cost_usd") or 0.0)
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return 0.0


def spent_cost(out: Path) -> float:
    """What the calls recorded in a run directory's journals cost (the ``cost`` of each lineage step).

    Calls of units that were in flight when a run stopped are not in a journal; they were cached, so
    the run that resumes gets them back at no cost."""
    total = 0.0
    for name in ("candidates.jsonl", HELD_JOURNAL):
        path = Path(out) / name
        if not path.exists():
            continue
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line: resume cuts it
                seen = set()
                for step in rec.get("lineage") or []:
                    if isinstance(step, dict) and step.get("cost") and step.get("step") not in seen:
                        seen.add(step.get("step"))
                        total += float(step["cost"])
    return total


def price_of(spec: str) -> tuple[float, float] | None:
    """Dollars per (prompt, completion) token for a model spec, from litellm's price table (read as a
    file); None for a model it does not list and for local backends (``llamacpp:``, ``transformers:``...)."""
    from .backends import split_spec

    prefix, rest = split_spec(spec)
    if prefix not in ("openai", "litellm") or not rest:
        return None
    from .kit.http import price_per_token

    return price_per_token(rest)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str, sort_keys=True))


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_pipeline(config: RunConfig, registry: Registry, max_cost: float | None = None) -> dict[str, Any]:
    """Run synchronously (the CLI's entry point into the async engine).

    Ctrl-C and filesystem faults (disk full, a read-only or vanished directory) become one line:
    whatever they interrupted, finished units are in the journal and the same command resumes.
    ``max_cost`` (``--max-cost``, dollars) stops the run cleanly once its calls cost that much
    (:class:`BudgetSpent`, resumable; not part of the run's settings, so a higher limit continues it).
    """
    return execute_run(Run(config, registry, max_cost=max_cost))


def execute_run(run: Run) -> dict[str, Any]:
    """Execute ``run`` synchronously, with :func:`run_pipeline`'s handling of Ctrl-C and filesystem faults."""
    log_warnings_to_stderr()
    out = run.config.out_dir
    try:
        return asyncio.run(run.execute())
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; finished units are kept in {out}: re-run the same command to resume") from None
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise BtkitError(f"{where}{e.strerror or e}; finished units are kept in {out}: "
                         f"fix that, then re-run the same command to resume") from None


# -- --dry-run ------------------------------------------------------------------------------------
#: Characters per token in the dry run's estimate (no tokenizer is loaded: that would load the model).
CHARS_PER_TOKEN = 4.0
#: Completion tokens assumed for a call whose max_tokens the probe could not see.
DEFAULT_COMPLETION_TOKENS = 256


class _ProbeDone(BaseException):
    """Ends a stage's probe at its first model call (a BaseException, so no stage's ``except Exception`` keeps it)."""


class _ProbeBackend(Backend):
    """What a probed stage sees as its backend: chat only, no network, never called."""

    capabilities = frozenset({"chat"})

    def __init__(self, spec: str):
        self.spec = spec

    def identity(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def require(self, capability: str, why: str) -> None:
        """A stage that insists on a capability is probed as if the real backend had it (checked at run time)."""

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:  # pragma: no cover
        raise _ProbeDone()


class _ProbeCtx:
    """A stage context that renders the stage's first call and stops there: what it would send, never sent."""

    def __init__(self, run: "Run", stage: Stage, record: Record):
        self.run, self.stage, self.record = run, stage, record
        self.seen: dict[str, Any] | None = None

    @property
    def prompts(self) -> PromptLibrary:
        return self.run.prompts_for(self.stage)

    def backend(self) -> Backend:
        return _ProbeBackend(self.run.model_for(self.stage))

    def for_record(self, record: Record) -> "_ProbeCtx":
        return self

    def count(self, key: str, n: int = 1) -> None:
        pass

    def _seen(self, template: str | None, variables: dict[str, Any], completion: int | None, extra_chars: int = 0,
              choices: int = 1) -> None:
        chars = extra_chars
        if template is not None:
            prompt = self.prompts.render(template, variables)
            chars += sum(len(str(m.get("content") or "")) for m in prompt.messages) + len(prompt.assistant_prefix or "")
        self.seen = {"template": template, "prompt_chars": chars, "max_tokens": completion, "choices": choices}
        raise _ProbeDone()

    async def complete(self, template: str, variables: dict[str, Any], *, parse: Any = None, retries: Any = None,
                       accept_truncated: bool = False, **params: Any) -> Any:
        self._seen(template, variables, params.get("max_tokens"))

    async def complete_choices(self, template: str, variables: dict[str, Any], records: list[Record], *, parse: Any,
                               retries: Any = None, **params: Any) -> Any:
        self._seen(template, variables, params.get("max_tokens"), choices=len(records))

    async def next_token_logprobs(self, template: str, variables: dict[str, Any], candidates: list[str]) -> Any:
        self._seen(template, variables, 0)

    async def score_continuation(self, template: str | None, variables: dict[str, Any], continuation: str, *,
                                 end_of_turn: bool = False) -> Any:
        self._seen(template, variables, 0, extra_chars=len(continuation or ""))


def _placeholders(run: "Run", stage: Stage, unit: Record) -> dict[str, Any]:
    """A unit's fields plus stand-ins for what earlier stages would have added (an instruction, a response)."""
    fields = dict(unit.fields)
    text = next((v for k, v in fields.items() if isinstance(v, str) and k in ("text", "response", "instruction")), "")
    try:
        info = next(i for i in run.registry.method(stage.method).stages if i.name == stage.name)
        inputs = info.inputs
    except (StopIteration, BtkitError):
        inputs = ()
    for name in inputs:
        if name in fields:
            continue
        if name in ("response", "document", "text", "answer", "output"):
            fields[name] = text
        elif name in ("instruction", "task_instruction", "question", "prompt"):
            fields[name] = "Explain what the following text says about " + " ".join(str(text).split()[:12]) + "."
        elif name.endswith("s"):  # constraints, examples, rounds...
            fields[name] = []
        else:
            fields[name] = ""
    return fields


def estimate_run(config: RunConfig, registry: Registry, sample: int = 5) -> dict[str, Any]:
    """What ``--dry-run`` prints: per stage the calls a run would make, tokens and cost, with no model call.

    The input is read and checked as a run would (the same units, a journal's finished units
    subtracted); no backend is made, nothing is written. Per stage: records reaching it (every unit
    alive after preparing, at the first stage; later stages assume every record survives, an
    upper bound) times :meth:`Stage.calls_per_record`; prompt tokens from the stage's first call
    rendered for ``sample`` units (stand-ins for fields an earlier stage would add) at
    :data:`CHARS_PER_TOKEN`; completion tokens from that call's ``max_tokens`` (an upper bound);
    cost from litellm's price table where it lists the model (:func:`price_of`).
    """
    import dataclasses

    run = Run(dataclasses.replace(config, use_cache=False), registry)
    run.check_templates()
    path = run.out / "candidates.jsonl"
    found = journal.scan(path) if path.exists() else journal.JournalScan()
    n_units = run.source.survey(path, found)
    done = max(0, found.units - len(found.failed))
    alive, samples = 0, []
    for i, (_, unit) in enumerate(run.source.as_surveyed()):
        if i < done or isinstance(unit, ExtraUnit) or not unit.alive:
            continue
        alive += 1
        if len(samples) < sample:
            samples.append(unit)

    async def probe(stage: Stage, unit: Record) -> dict[str, Any] | None:
        rec = Record(id=unit.id, source_id=unit.source_id, fields=_placeholders(run, stage, unit))
        ctx = _ProbeCtx(run, stage, rec)
        try:
            await stage.process(rec, ctx)
        except _ProbeDone:
            return ctx.seen
        except Exception:  # noqa: BLE001 (a stage that needs more than stand-ins: its tokens stay unknown)
            return None
        return {"no_call": True}  # the stage finished this record without calling a model

    async def probe_all() -> list[list[dict[str, Any] | None]]:
        return [[await probe(stage, u) for u in samples] for stage in run.stages]

    probes = asyncio.run(probe_all()) if samples else [[] for _ in run.stages]
    rows, records = [], alive
    for stage, seen in zip(run.stages, probes):
        no_call = bool(seen) and all(s and s.get("no_call") for s in seen)
        seen = [s for s in seen if s and not s.get("no_call")]
        try:
            per_record = 0.0 if no_call else float(stage.calls_per_record(stage.options))
        except Exception:  # noqa: BLE001
            per_record = 1.0
        if seen and not no_call and type(stage).calls_per_record is Stage.calls_per_record:
            # a stage that says nothing but asks for N candidates at once: N calls (one per candidate
            # where the backend cannot sample several in one request, the upper bound)
            per_record = max(per_record, sum(x.get("choices", 1) for x in seen) / len(seen))
        calls = records * per_record
        spec = run.model_for(stage)
        if no_call:
            prompt_tokens, completion = 0.0, 0.0
        elif seen:
            prompt_tokens = sum(s["prompt_chars"] for s in seen) / len(seen) / CHARS_PER_TOKEN
            max_tokens = [s["max_tokens"] for s in seen if s["max_tokens"] is not None]
            completion = (sum(max_tokens) / len(max_tokens)) if max_tokens else float(stage.options.get("max_tokens") or DEFAULT_COMPLETION_TOKENS)
        else:
            prompt_tokens, completion = None, float(stage.options.get("max_tokens") or DEFAULT_COMPLETION_TOKENS)
        price = price_of(spec)
        tokens_in = None if prompt_tokens is None else calls * prompt_tokens
        tokens_out = calls * completion
        cost = 0.0 if calls == 0 else None if price is None or tokens_in is None else tokens_in * price[0] + tokens_out * price[1]
        rows.append({"stage": stage.label, "model": spec, "records": records, "calls_per_record": per_record,
                     "calls": calls, "prompt_tokens": tokens_in, "completion_tokens": tokens_out,
                     "prompt_tokens_per_call": prompt_tokens, "max_tokens_per_call": completion,
                     "price": price, "cost_usd": cost, "probed": len(seen)})
        if seen:  # N candidates of one record are N records for the stages after it
            records *= sum(x.get("choices", 1) for x in seen) / len(seen)
    costs = [r["cost_usd"] for r in rows]
    return {"units": n_units, "units_done": done, "records": alive, "stages": rows, "sample": len(samples),
            "total_calls": sum(r["calls"] for r in rows),
            "total_cost_usd": sum(c for c in costs if c is not None) if any(c is not None for c in costs) else None,
            "unpriced": sorted({r["model"] for r in rows if r["price"] is None})}


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


def format_estimate(est: dict[str, Any]) -> str:
    """The ``--dry-run`` report: one line per stage and a total, every figure called an estimate."""
    lines = [f"dry run: no model called, nothing written. {est['units']} units"
             + (f" ({est['units_done']} already finished in the run directory)" if est["units_done"] else "")
             + f", {est['records']} to send to the first stage.",
             f"{'stage':<28} {'calls':>9} {'prompt tok':>11} {'completion tok':>15}  cost (estimate)"]
    for r in est["stages"]:
        per = "" if r["calls_per_record"] == 1 else f" ({r['calls_per_record']:g}/record)"
        cost = f"${r['cost_usd']:.4f}" if r["cost_usd"] is not None else (f"no price ({r['model']})" if r["price"] is None else "? (tokens unknown)")
        lines.append(f"{r['stage']:<28} {_num(r['calls']):>9} {_num(r['prompt_tokens']):>11} {_num(r['completion_tokens']):>15}  {cost}{per}")
    total = est["total_cost_usd"]
    lines.append(f"{'total':<28} {_num(est['total_calls']):>9} {'':>11} {'':>15}  "
                 + (f"${total:.4f}" if total is not None else "no price") + (" (priced stages only)" if total is not None and est["unpriced"] else ""))
    lines.append(f"Estimate: every record is assumed to reach every stage (an upper bound) with the calls per record a stage "
                 f"declares (1 where it does not say); prompt tokens from the templates rendered for {est['sample']} sample units "
                 f"at ~{CHARS_PER_TOKEN:g} characters per token; completion tokens at max_tokens (an upper bound); cached calls "
                 f"would cost nothing and are not subtracted; prices from litellm's table where it lists the model.")
    return "\n".join(lines)
